//! The reference's test vectors and captured bodies from the real SDKs.

use cairn_protocol::signature::{
    bearer_matches, canonical_json, hash_signing_key, sign, verify, SignatureError,
};
use cairn_protocol::step_id::{hash, StepIdCounter};
use cairn_protocol::*;
use serde_json::json;

const KEY: &str = "signkey-test-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn step_id_vectors() {
    for (pre, want) in [
        ("first step", "98bf98df193bcce7c33e6bc50927cf2ac21206cb"),
        ("sleep", "c3ca5f787365eae0dea86250e27d476406956478"),
        ("second step", "764e20ec975d4ef820d0f42e6a5833384bd7ee36"),
        ("wait", "daaad336276d15594d0e765f96c17cd746bf4971"),
        ("my-step-id", "e7d8a2f140845095749d60246ff1110c9d01d76a"),
        ("my-step-id:1", "f47c6228c581af870aa285200cf95ec3ac59bb6a"),
        ("p", "516b9783fca517eecbd1d064da2d165310b19759"),
        ("p:1", "752881753aa4941a0c67a22880d9b4c06c562ff5"),
        ("complete", RUN_COMPLETE_ID),
    ] {
        assert_eq!(hash(pre), want, "hash of {pre:?}");
    }
}

#[test]
fn repeated_ids_get_suffixes_in_order() {
    let mut c = StepIdCounter::default();
    let ids: Vec<_> = (0..3).map(|_| c.next("my-step-id")).collect();
    assert_eq!(ids[0].hashed, "e7d8a2f140845095749d60246ff1110c9d01d76a");
    assert_eq!(ids[1].hashed, "f47c6228c581af870aa285200cf95ec3ac59bb6a");
    assert_eq!(ids[1].index, Some(1));
    assert_eq!(ids[2].hashed, hash("my-step-id:2"));
    // Other ids count separately.
    assert_eq!(c.next("other").index, None);
}

#[test]
fn signature_vectors() {
    assert_eq!(
        sign(KEY, br#"{"a":1}"#, 1_700_000_000),
        "t=1700000000&s=6f935f4999a22697d3186d2f528b9ba93bd1bce44e799b690985927c66c072d2"
    );
    assert_eq!(
        sign(KEY, b"", 1_700_000_000),
        "t=1700000000&s=a5b3848cf54a129e782a682980081eaa0fea9734d52e1e52f1eca244b671e009"
    );
}

#[test]
fn verify_canonicalises_and_checks_time_and_keys() {
    let header = sign(KEY, br#"{"a":1,"b":[true,null]}"#, 1_700_000_000);
    let raw = br#"{ "b": [true, null], "a": 1 }"#;
    assert_eq!(verify(Some(&header), raw, &[KEY], 1_700_000_000), Ok(0));
    // Fallback key matches second.
    assert_eq!(
        verify(
            Some(&header),
            raw,
            &["signkey-test-ffff", KEY],
            1_700_000_000
        ),
        Ok(1)
    );
    assert_eq!(
        verify(Some(&header), raw, &["signkey-test-ffff"], 1_700_000_000),
        Err(SignatureError::Mismatch)
    );
    // Five minutes either way.
    assert_eq!(verify(Some(&header), raw, &[KEY], 1_700_000_300), Ok(0));
    assert_eq!(
        verify(Some(&header), raw, &[KEY], 1_700_000_301),
        Err(SignatureError::Expired)
    );
    assert_eq!(
        verify(Some(&header), raw, &[KEY], 1_699_999_699),
        Err(SignatureError::Expired)
    );
    assert_eq!(verify(None, raw, &[KEY], 0), Err(SignatureError::Missing));
    assert_eq!(
        verify(Some("t=abc&s=00"), raw, &[KEY], 0),
        Err(SignatureError::Malformed)
    );
    assert!(matches!(
        verify(Some(&header), b"{not json", &[KEY], 1_700_000_000),
        Err(SignatureError::Body(_))
    ));
    // A tampered body fails.
    assert_eq!(
        verify(
            Some(&header),
            br#"{"a":2,"b":[true,null]}"#,
            &[KEY],
            1_700_000_000
        ),
        Err(SignatureError::Mismatch)
    );
}

#[test]
fn bearer_hash_vectors() {
    assert_eq!(
        hash_signing_key("signkey-prod-12345678").unwrap(),
        "signkey-prod-b2ed992186a5cb19f6668aade821f502c1d00970dfd0e35128d51bac4649916c"
    );
    assert_eq!(
        hash_signing_key(KEY).unwrap(),
        "signkey-test-4884fdaafea47c29fea7159d0daddd9c085d6200e1359e85bb81736af6b7c837"
    );
    assert!(hash_signing_key("signkey-test-xyz").is_none());
    // Python sends the bare hash, JS the prefixed one: both accepted.
    assert!(bearer_matches(
        "4884fdaafea47c29fea7159d0daddd9c085d6200e1359e85bb81736af6b7c837",
        KEY
    ));
    assert!(bearer_matches(&hash_signing_key(KEY).unwrap(), KEY));
    assert!(!bearer_matches("", KEY));
}

#[test]
fn call_request_round_trips_with_every_key() {
    let body = json!({
        "ctx": {"attempt": 0, "disable_immediate_execution": false, "env": "", "fn_id": "f",
                "max_attempts": 5, "qi_id": "q", "run_id": "01JRUN", "step_id": "step",
                "stack": {"current": 1, "stack": ["98bf98df193bcce7c33e6bc50927cf2ac21206cb"]},
                "use_api": false, "request_id": "ignored"},
        "event": {"data": {"id": "1"}, "id": "01JEVT", "name": "test/steps", "ts": 1700000000000i64, "user": {}},
        "events": [{"data": {"id": "1"}, "id": "01JEVT", "name": "test/steps", "ts": 1700000000000i64, "user": {}}],
        "steps": {"98bf98df193bcce7c33e6bc50927cf2ac21206cb": {"data": "A"}},
        "use_api": false, "version": 1, "defers": {}
    });
    let req: CallRequest = serde_json::from_value(body).unwrap();
    assert_eq!(req.ctx.stack.current, 1);
    assert_eq!(req.ctx.max_attempts, Some(5));
    assert_eq!(req.event.ts, 1_700_000_000_000);
    let out = serde_json::to_value(&req).unwrap();
    for key in ["event", "events", "steps", "ctx", "version", "use_api"] {
        assert!(out.get(key).is_some(), "{key} must always be sent");
    }
    // JCS sorts keys, so `ctx` comes first and `version` last.
    let canon = String::from_utf8(canonical_json(&req)).unwrap();
    assert!(canon.starts_with(r#"{"ctx":{"attempt":0,"#), "{canon}");
    assert!(
        canon.ends_with(r#""use_api":false,"version":1}"#),
        "{canon}"
    );
}

#[test]
fn minimal_call_request_uses_defaults() {
    let req: CallRequest =
        serde_json::from_value(json!({"event": {"name": "a"}, "ctx": {"run_id": "r"}})).unwrap();
    assert_eq!(req.version, -1);
    assert_eq!(req.ctx.step_id, "step");
    assert!(req.steps.is_empty());
    assert_eq!(req.event.data, json!({}));
}

#[test]
fn ops_parse_from_real_sdk_bodies() {
    // JS 3.52.4 parallel plan.
    let ops = parse_ops(br#"[{"displayName":"p","op":"StepPlanned","id":"516b9783fca517eecbd1d064da2d165310b19759","name":"p","opts":{},"userland":{"id":"p"},"data":null},
 {"displayName":"p","op":"StepPlanned","id":"752881753aa4941a0c67a22880d9b4c06c562ff5","name":"p","opts":{},"userland":{"id":"p","index":1},"data":null}]"#).unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[1].op, Opcode::StepPlanned);
    assert_eq!(ops[1].userland.as_ref().unwrap().index, Some(1));
    // Python: opts null, index null.
    let ops = parse_ops(br#"[{"displayName":"first step","id":"98bf","name":"first step","op":"StepRun","opts":null,"userland":{"id":"first step","index":null},"data":"A"}]"#).unwrap();
    assert_eq!(ops[0].data, Some(json!("A")));
    // Step failure keeps unknown error keys.
    let ops = parse_ops(br#"{"id":"c5","op":"stepfailed","error":{"name":"Error","message":"step broke","stack":"s","__serialized":true}}"#).unwrap();
    let err = ops[0].error.as_ref().unwrap();
    assert_eq!(ops[0].op, Opcode::StepFailed);
    assert_eq!(err.message, "step broke");
    assert_eq!(err.extra.get("__serialized"), Some(&json!(true)));
    // Wait-for-event keeps its event name in `name`.
    let ops = parse_ops(br#"[{"displayName":"wait","op":"WaitForEvent","id":"daaa","name":"test/resume","opts":{"timeout":"1h","if":"async.data.id == event.data.id"}}]"#).unwrap();
    assert_eq!(ops[0].opt_str("timeout"), Some("1h"));
    assert_eq!(ops[0].label(), "wait");
    assert!(matches!(
        parse_ops(br#"[{"op":"Bogus","id":"x"}]"#).unwrap()[0].op,
        Opcode::Unknown(_)
    ));
    assert!(parse_ops(b"").is_err());
}

#[test]
fn memo_shapes() {
    assert_eq!(
        Memo::from_value(json!({"data": null})),
        Memo::Data(json!(null))
    );
    match Memo::from_value(json!({"error": {"name": "Error", "message": "m"}})) {
        Memo::Error(e) => assert_eq!(e.message, "m"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Memo::from_value(json!({"input": [1]})),
        Memo::Input(vec![json!(1)])
    );
    // An event object (a matched wait) is taken as it is.
    let ev = json!({"name": "a", "data": {}, "id": "x", "ts": 1});
    assert_eq!(Memo::from_value(ev.clone()), Memo::Raw(ev));
    assert_eq!(
        Memo::from_value(json!({"data": 1, "x": 2})),
        Memo::Raw(json!({"data": 1, "x": 2}))
    );
    assert_eq!(
        Memo::from_value(json!({"error": "text"})),
        Memo::Raw(json!({"error": "text"}))
    );
}

#[test]
fn register_accepts_js_and_python_spellings() {
    let js: RegisterRequest = serde_json::from_value(json!({
        "url": "http://app/api/inngest", "deployType": "ping", "framework": "edge", "appName": "myapp",
        "functions": [{"id": "myapp-steps", "name": "steps",
            "triggers": [{"event": "test/steps", "expression": "event.data.x == 1"}, {"cron": "0 * * * *"}],
            "steps": {"step": {"id": "step", "name": "step", "runtime": {"type": "http", "url": "http://app/api/inngest?fnId=myapp-steps&stepId=step"}, "retries": {"attempts": 3}}},
            "concurrency": [{"limit": 5, "key": "event.data.k"}], "cancel": [{"event": "test/cancel", "if": "event.data.id == async.data.id"}]}],
        "sdk": "js:v3.52.4", "v": "0.1", "capabilities": {"trust_probe": "v1"}, "featureObservations": {}
    })).unwrap();
    assert_eq!(js.app_name, "myapp");
    let f = &js.functions[0];
    assert_eq!(f.retries(), 3);
    assert_eq!(
        f.url(),
        Some("http://app/api/inngest?fnId=myapp-steps&stepId=step")
    );
    assert!(matches!(&f.triggers[1], Trigger::Cron { cron, .. } if cron == "0 * * * *"));
    assert_eq!(f.concurrency.as_ref().unwrap().limits()[0].limit, 5);
    assert_eq!(f.cancel.len(), 1);

    let py: RegisterRequest = serde_json::from_value(json!({
        "url": "http://app/api/inngest", "deploy_type": "ping", "framework": "flask", "appname": "pyapp",
        "functions": [{"id": "pyapp-f", "name": "f", "triggers": [{"event": "e"}], "concurrency": 2, "cancel": null,
            "steps": {"step": {"id": "step", "name": "step", "runtime": {"type": "http", "url": "http://app/api/inngest?fnId=pyapp-f&stepId=step"}}}}],
        "sdk": "py:v0.5.19", "v": "0.1"
    })).unwrap();
    assert_eq!(py.app_name, "pyapp");
    assert_eq!(py.functions[0].retries(), function::DEFAULT_RETRIES);
    assert!(serde_json::from_value::<RegisterRequest>(json!({"url": "x"})).is_err());
    // Serialising writes the JS spelling.
    let out = serde_json::to_value(&py).unwrap();
    assert_eq!(out["appName"], "pyapp");
    assert_eq!(out["deployType"], "ping");
}

#[test]
fn durations() {
    use std::time::Duration;
    assert_eq!(duration::parse("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(duration::parse("1w").unwrap(), Duration::from_secs(604_800));
    assert_eq!(
        duration::parse("500ms").unwrap(),
        Duration::from_millis(500)
    );
    assert!(duration::parse("").is_err());
    assert!(duration::parse("1 fortnight").is_err());
    assert_eq!(duration::format(Duration::from_secs(3661)), "1h1m1s");
}

#[test]
fn canonical_json_orders_keys_by_utf16_code_units() {
    // RFC 8785 and the SDKs' canonicalisers (JS `canonicalize`, Python `jcs`) compare keys as
    // UTF-16: U+1F600 (a surrogate pair, 0xD83D…) sorts before U+FF61, though its UTF-8
    // bytes sort after. Byte order here would make every signature over such a body fail.
    let v = json!({"\u{FF61}": 1, "\u{1F600}": 2, "a": 3});
    assert_eq!(
        String::from_utf8(canonical_json(&v)).unwrap(),
        "{\"a\":3,\"\u{1F600}\":2,\"\u{FF61}\":1}"
    );
}
