"""Markdown case x SDK table from a junit report: `python harness/table.py results/junit.xml`.

pass / FAIL / xfail (known failure, reason in cases/known_failures.py) / skip / n/a.
"""

import re
import sys
import xml.etree.ElementTree as ET

SDKS = ("js3", "js4", "py")


def main(path: str):
    root = ET.parse(path).getroot()
    rows: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for case in root.iter("testcase"):
        name = case.get("name")
        m = re.fullmatch(r"(.+?)\[(.+)\]", name)
        base, param = (m.group(1), m.group(2)) if m else (name, "")
        sdk = next((s for s in SDKS if param == s or param.startswith(s + "-") or param.endswith("-" + s)), None)
        if sdk is None:
            base, sdk = (f"{base}[{param}]" if param else base), "any"
        mod = (case.get("classname") or "").split(".")[-1].removeprefix("test_")
        key = f"{mod}: {base.removeprefix('test_')}"
        if key not in rows:
            rows[key] = {}
            order.append(key)
        kinds = {c.tag: c for c in case}
        if "failure" in kinds or "error" in kinds:
            status = "FAIL"
        elif "skipped" in kinds:
            status = "xfail" if "xfail" in (kinds["skipped"].get("type") or "") else "skip"
        else:
            status = "pass"
        rows[key][sdk] = status
    print("| case | js3 | js4 | py |")
    print("|---|---|---|---|")
    order.sort(key=lambda k: k.split(":")[0])  # group by module; stable within one
    for key in order:
        r = rows[key]
        if "any" in r:
            print(f"| {key} | {r['any']} (SDK-independent) | | |")
        else:
            print(f"| {key} | " + " | ".join(r.get(s, "n/a") for s in SDKS) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
