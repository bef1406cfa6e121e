// The conformance fixture functions, shared by the inngest@3 and inngest@4 apps.
//
// This module imports nothing from `inngest` itself: each app passes in its own copy of the
// package (js3/ and js4/ pin different majors), so the very same function definitions run
// on both. py/app.py mirrors every function here with the same ids, events and outputs.
//
// Besides /api/inngest the server answers:
//   GET /counters  -> {"counters": {...}, "records": {...}, "gauges": {name: {now, max}}}
//                     (what the step bodies did; gauges count bodies in progress)
// Counters are bumped only inside step bodies (which run once per attempt), or under a
// "reached-*" name for handler code that replays on every call.

import http from "node:http";

const APP_ID = "conformance";

export function startApp({ inngest: mod, serve, major }) {
  const { Inngest, NonRetriableError, RetryAfterError, referenceFunction } = mod;

  const counters = {};
  const records = {};
  const bump = (name, runId) => {
    counters[name] = (counters[name] || 0) + 1;
    if (runId) {
      const k = `${name}@${runId}`;
      counters[k] = (counters[k] || 0) + 1;
      return counters[k];
    }
    return counters[name];
  };
  const record = (name, value) => {
    (records[name] = records[name] || []).push(value);
  };
  // Gauges: how many step bodies are inside a section now, and the most ever at once
  // (flow-control cases check in-progress counts with these).
  const gauges = {};
  const enter = (name) => {
    const g = (gauges[name] = gauges[name] || { now: 0, max: 0 });
    g.now += 1;
    if (g.now > g.max) g.max = g.now;
  };
  const leave = (name) => {
    gauges[name].now -= 1;
  };

  const client = new Inngest({ id: APP_ID });

  // inngest@3 takes (options, trigger, handler); inngest@4 takes ({...options, triggers}, handler).
  const fn = (options, trigger, handler) =>
    major >= 4
      ? client.createFunction({ ...options, triggers: [trigger] }, handler)
      : client.createFunction(options, trigger, handler);

  const sleepMs = (ms) => new Promise((r) => setTimeout(r, ms));

  const functions = [];
  const add = (f) => {
    functions.push(f);
    return f;
  };

  // serial: two steps in sequence (C-CONF-03 ids).
  add(
    fn({ id: "serial" }, { event: "conf/serial" }, async ({ event, step, runId }) => {
      const first = await step.run("first step", () => {
        bump("first step", runId);
        return "first step";
      });
      const second = await step.run("second step", () => {
        bump("second step", runId);
        return { first, second: true };
      });
      return { name: event.name, body: "ok", first, second };
    }),
  );

  // parallel: three steps at once, then one more (C-SDK-10 ids a/b/c/d).
  add(
    fn({ id: "parallel" }, { event: "conf/parallel" }, async ({ step, runId }) => {
      const [a, b, c] = await Promise.all(
        ["a", "b", "c"].map((id) =>
          step.run(id, () => {
            bump(id, runId);
            return id;
          }),
        ),
      );
      const d = await step.run("d", () => {
        bump("d", runId);
        return "d";
      });
      return { a, b, c, d };
    }),
  );

  // race: the first of two parallel steps wins; "slow" sleeps in its body.
  add(
    fn({ id: "race" }, { event: "conf/race" }, async ({ step, runId, group }) => {
      const contenders = () =>
        Promise.race([
          step.run("fast", () => {
            bump("fast", runId);
            return "fast";
          }),
          step.run("slow", async () => {
            bump("slow", runId);
            await sleepMs(1500);
            return "slow";
          }),
        ]);
      // inngest@4 needs an explicit race group (optimizeParallelism waits for all otherwise).
      const winner = major >= 4 ? await group.parallel({ mode: "race" }, contenders) : await contenders();
      const after = await step.run("after", () => {
        bump("after", runId);
        return "after";
      });
      return { winner, after };
    }),
  );

  // retry: a step fails on its first attempt with a plain error, then succeeds.
  add(
    fn({ id: "retry", retries: 2 }, { event: "conf/retry" }, async ({ step, runId }) => {
      const v = await step.run("flaky", () => {
        const n = bump("flaky", runId);
        record("flaky-at", Date.now());
        if (n === 1) throw new Error("flaky failure");
        return `recovered after ${n} attempts`;
      });
      return { value: v };
    }),
  );

  // retry-fn: the handler itself (no step) fails on attempt 0, succeeds on attempt 1.
  add(
    fn({ id: "retry-fn", retries: 2 }, { event: "conf/retry-fn" }, async ({ attempt, runId }) => {
      bump("handler", runId);
      record("attempts", attempt);
      if (attempt === 0) throw new Error("handler failure");
      return { attempt };
    }),
  );

  // non-retriable: the step throws NonRetriableError; retries must not happen.
  add(
    fn({ id: "non-retriable", retries: 3 }, { event: "conf/non-retriable" }, async ({ step, runId }) => {
      await step.run("fatal", () => {
        bump("fatal", runId);
        throw new NonRetriableError("no retry plz");
      });
      bump("reached-after-fatal", runId);
      return "unreachable";
    }),
  );

  // retry-after: the step asks to be retried after 1 s; default backoff would be >= 15 s.
  add(
    fn({ id: "retry-after", retries: 2 }, { event: "conf/retry-after" }, async ({ step, runId }) => {
      const v = await step.run("throttled", () => {
        const n = bump("throttled", runId);
        record("throttled-at", Date.now());
        if (n === 1) throw new RetryAfterError("slow down", "1s");
        return `ok after ${n}`;
      });
      return { value: v };
    }),
  );

  // fail-handled: a final failure (no retries) runs the onFailure handler with the error.
  add(
    fn(
      {
        id: "fail-handled",
        retries: 0,
        onFailure: async ({ error, event, runId }) => {
          bump("onFailure");
          record("onFailure", {
            message: error?.message ?? null,
            function_id: event?.data?.function_id ?? null,
            run_id: event?.data?.run_id ?? null,
            original_event: event?.data?.event?.name ?? null,
            failure_run_id: runId,
          });
          return "handled";
        },
      },
      { event: "conf/fail-handled" },
      async ({ step, runId }) => {
        await step.run("doomed", () => {
          bump("doomed", runId);
          throw new Error("final failure");
        });
        return "unreachable";
      },
    ),
  );

  // sleep: a 2 s relative sleep between two timestamped steps.
  add(
    fn({ id: "sleep" }, { event: "conf/sleep" }, async ({ step }) => {
      const before = await step.run("before", () => Date.now());
      await step.sleep("nap", "2s");
      const after = await step.run("after", () => Date.now());
      return { slept_ms: after - before };
    }),
  );

  // sleep-until: sleeps until an absolute time 2 s after the first step.
  add(
    fn({ id: "sleep-until" }, { event: "conf/sleep-until" }, async ({ step }) => {
      const before = await step.run("before", () => Date.now());
      await step.sleepUntil("until", new Date(before + 2000));
      const after = await step.run("after", () => Date.now());
      return { slept_ms: after - before };
    }),
  );

  // wait-match: waitForEvent with `match` (Python: the equivalent `if`).
  add(
    fn({ id: "wait-match" }, { event: "conf/wait-match" }, async ({ step, runId }) => {
      bump("reached-wait", runId);
      const ev = await step.waitForEvent("wait", {
        event: "conf/wait-match.resume",
        match: "data.id",
        timeout: "20s",
      });
      return { matched: ev !== null, data: ev ? ev.data : null };
    }),
  );

  // wait-if: waitForEvent with an `if` expression.
  add(
    fn({ id: "wait-if" }, { event: "conf/wait-if" }, async ({ step, runId }) => {
      bump("reached-wait", runId);
      const ev = await step.waitForEvent("wait", {
        event: "conf/wait-if.resume",
        if: "async.data.ok == true && async.data.id == event.data.id",
        timeout: "20s",
      });
      return { matched: ev !== null, data: ev ? ev.data : null };
    }),
  );

  // wait-timeout: nobody sends the event; the wait resolves to null after 2 s.
  add(
    fn({ id: "wait-timeout" }, { event: "conf/wait-timeout" }, async ({ step }) => {
      const ev = await step.waitForEvent("wait", {
        event: "conf/wait-timeout.never",
        timeout: "2s",
      });
      return { matched: ev !== null };
    }),
  );

  // invoke: children and their parents.
  const child = add(
    fn({ id: "invoke-child", retries: 0 }, { event: "conf/invoke-child.never" }, async ({ event }) => {
      bump("invoke-child");
      return { doubled: event.data.n * 2 };
    }),
  );
  const childFail = add(
    fn({ id: "invoke-child-fail", retries: 0 }, { event: "conf/invoke-child-fail.never" }, async () => {
      bump("invoke-child-fail");
      throw new Error("child broke");
    }),
  );
  const childSlow = add(
    fn({ id: "invoke-child-slow", retries: 0 }, { event: "conf/invoke-child-slow.never" }, async ({ step }) => {
      await step.sleep("long", "30s");
      return "too late";
    }),
  );
  add(
    fn({ id: "invoke", retries: 0 }, { event: "conf/invoke" }, async ({ step }) => {
      const res = await step.invoke("call-child", { function: child, data: { n: 21 } });
      return { child: res };
    }),
  );
  add(
    fn({ id: "invoke-failure", retries: 0 }, { event: "conf/invoke-failure" }, async ({ step }) => {
      try {
        await step.invoke("call-child", { function: childFail, data: {} });
        return { caught: false };
      } catch (err) {
        return { caught: true, name: err?.name ?? null, message: String(err?.message ?? err) };
      }
    }),
  );
  add(
    fn({ id: "invoke-timeout", retries: 0 }, { event: "conf/invoke-timeout" }, async ({ step }) => {
      try {
        await step.invoke("call-child", { function: childSlow, data: {}, timeout: "1s" });
        return { caught: false };
      } catch (err) {
        return { caught: true, name: err?.name ?? null, message: String(err?.message ?? err) };
      }
    }),
  );

  // invoke-missing: the target function does not exist; the server must fail the invoke
  // step at once (upstream emits a finished event with an error) instead of waiting out
  // the 60 s timeout.
  add(
    fn({ id: "invoke-missing", retries: 0 }, { event: "conf/invoke-missing" }, async ({ step }) => {
      try {
        await step.invoke("call-missing", {
          function: referenceFunction({ functionId: "does-not-exist" }),
          data: {},
          timeout: "60s",
        });
        return { caught: false };
      } catch (err) {
        return { caught: true, name: err?.name ?? null, message: String(err?.message ?? err) };
      }
    }),
  );

  // send-event: a step sends an event that triggers send-receiver.
  add(
    fn({ id: "send-event" }, { event: "conf/send-event" }, async ({ step, event }) => {
      const res = await step.sendEvent("send", {
        name: "conf/sent-by-step",
        data: { tag: event.data.tag },
      });
      return { ids: res.ids };
    }),
  );
  add(
    fn({ id: "send-receiver" }, { event: "conf/sent-by-step" }, async ({ event }) => {
      bump("send-receiver");
      return { tag: event.data.tag };
    }),
  );

  // cancel-on: cancelled by a matching event (or the REST API) while sleeping.
  add(
    fn(
      {
        id: "cancel-on",
        cancelOn: [{ event: "conf/cancel-on.cancel", match: "data.id" }],
      },
      { event: "conf/cancel-on" },
      async ({ step, runId }) => {
        await step.run("start", () => {
          bump("start", runId);
          return "started";
        });
        bump("reached-sleep", runId);
        await step.sleep("nap", "8s");
        await step.run("after-sleep", () => {
          bump("after-sleep", runId);
          return "should not happen";
        });
        return "not cancelled";
      },
    ),
  );

  // batch: three events in one run.
  add(
    fn({ id: "batch", batchEvents: { maxSize: 3, timeout: "5s" } }, { event: "conf/batch" }, async ({ events }) => {
      bump("batch-run");
      return { count: events.length, seqs: events.map((e) => e.data.seq).sort() };
    }),
  );

  // big-batch: 10 events of ~450 KiB (under the 512 KiB event limit): the call body would
  // exceed 4 MiB, so use_api.
  add(
    fn(
      { id: "big-batch", batchEvents: { maxSize: 10, timeout: "5s" } },
      { event: "conf/big-batch" },
      async ({ events }) => {
        bump("big-batch-run");
        return { count: events.length, total: events.reduce((n, e) => n + e.data.blob.length, 0) };
      },
    ),
  );

  // big-steps: five 1 MiB step outputs; later calls exceed 4 MiB of state, so use_api.
  // Checkpointing off: inngest@4 would otherwise run all five in one request, never
  // needing use_api (test_founding_function covers 1 MiB checkpoints).
  add(
    fn({ id: "big-steps", checkpointing: false }, { event: "conf/big-steps" }, async ({ step, runId }) => {
      const lens = [];
      for (let i = 0; i < 5; i++) {
        const s = await step.run(`big-${i}`, () => {
          bump(`big-${i}`, runId);
          return String(i).repeat(1024 * 1024);
        });
        lens.push(s.length);
      }
      return { lens };
    }),
  );

  // loop: the same step id three times (hashes of "item", "item:1", "item:2").
  add(
    fn({ id: "loop" }, { event: "conf/loop" }, async ({ step, runId }) => {
      const out = [];
      for (let i = 0; i < 3; i++) {
        out.push(
          await step.run("item", () => {
            bump("item", runId);
            return i;
          }),
        );
      }
      return out;
    }),
  );

  // founding: the function of the founding report (inngest-js#1440).
  add(
    fn({ id: "founding" }, { event: "conf/founding" }, async ({ step, runId }) => {
      const big = await step.run("collect-data", () => {
        bump("collect-data", runId);
        return "x".repeat(1_000_000);
      });
      const digest = await step.run("digest", () => {
        bump("digest", runId);
        return big.slice(0, 100);
      });
      const fin = await step.run("finalize", () => {
        bump("finalize", runId);
        return { done: true };
      });
      return { len: digest.length, done: fin.done };
    }),
  );

  // long-steps: four steps of 4 s each; inngest@4's default checkpointing maxRuntime (10 s)
  // runs out during the third, so v4 hands control back with a DiscoveryRequest mid-run.
  add(
    fn({ id: "long-steps" }, { event: "conf/long-steps" }, async ({ step, runId }) => {
      const out = [];
      for (const id of ["slow-1", "slow-2", "slow-3", "slow-4"]) {
        out.push(
          await step.run(id, async () => {
            bump(id, runId);
            await sleepMs(4000);
            return id;
          }),
        );
      }
      return out;
    }),
  );

  // many-steps: six 1 s steps. Under a 3 s call timeout, inngest@4 (one request, many
  // checkpointed steps) outlives its call; its later checkpoints are stale dispatches.
  add(
    fn({ id: "many-steps" }, { event: "conf/many-steps" }, async ({ step, runId }) => {
      const out = [];
      for (let i = 1; i <= 6; i++) {
        out.push(
          await step.run(`tick-${i}`, async () => {
            bump(`tick-${i}`, runId);
            await sleepMs(1000);
            return i;
          }),
        );
      }
      return out;
    }),
  );

  // no-checkpoint: like serial, with checkpointing switched off for the function (the
  // classic one-step-per-request protocol even when the server offers checkpointing).
  add(
    fn({ id: "no-checkpoint", checkpointing: false }, { event: "conf/no-checkpoint" }, async ({ step, runId }) => {
      const a = await step.run("first step", () => {
        bump("first step", runId);
        return "first step";
      });
      const b = await step.run("second step", () => {
        bump("second step", runId);
        return "second step";
      });
      return [a, b];
    }),
  );

  // always-fails: the step fails on every attempt (retries 1 = 2 attempts); the handler
  // then rethrows the memoised step error, which must not be retried at function level.
  add(
    fn({ id: "always-fails", retries: 1 }, { event: "conf/always-fails" }, async ({ step, runId }) => {
      try {
        await step.run("boom", () => {
          bump("boom", runId);
          throw new Error("boom");
        });
      } catch (err) {
        bump("after-boom", runId);
        throw err;
      }
      return "unreachable";
    }),
  );

  // expr-trigger: only events whose data.type is "premium" start a run.
  add(
    fn({ id: "expr-trigger" }, { event: "conf/expr", if: "event.data.type == 'premium'" }, async ({ event }) => {
      bump("expr-trigger");
      return { type: event.data.type };
    }),
  );

  // parallel-fail: two parallel steps both fail for good; one failure -> one onFailure.
  add(
    fn(
      {
        id: "parallel-fail",
        retries: 0,
        onFailure: async ({ event }) => {
          bump("parallel-fail-onFailure");
          record("parallel-fail-onFailure", event?.data?.run_id ?? null);
        },
      },
      { event: "conf/parallel-fail" },
      async ({ step, runId }) => {
        await Promise.all(
          ["step-a", "step-b"].map((id) =>
            step.run(id, () => {
              bump(id, runId);
              throw new Error(`${id} failed`);
            }),
          ),
        );
        return "unreachable";
      },
    ),
  );

  // auth-probe: trivial function for the signing-key cases.
  add(
    fn({ id: "auth-probe", retries: 0 }, { event: "conf/auth-probe" }, async () => {
      bump("auth-probe");
      return "authorized";
    }),
  );

  // ---- flow control (conformance-cases.md §14–19, C-INV-07, C-FAIL-03) -------------------
  // Each flow function records what the cases time or count: `record(<id>, {t, run, …})`
  // when its step body starts, and gauges of step bodies in progress.

  // busy: hold the named gauges for `ms` inside a step body, recording the start first.
  const busy = async (names, ms, rec) => {
    names.forEach(enter);
    try {
      if (rec) record(rec[0], { t: Date.now(), ...rec[1] });
      await sleepMs(ms);
    } finally {
      names.forEach(leave);
    }
  };

  // C-CONC-01: step concurrency 1 (JS sends the bare-number shape).
  add(
    fn({ id: "flow-conc-fn", concurrency: 1 }, { event: "conf/flow-conc-fn" }, async ({ event, step, runId }) => {
      await step.run("work", () =>
        busy(["flow-conc-fn"], event.data.ms ?? 1500, ["flow-conc-fn", { run: runId, i: event.data.i ?? null }]),
      );
      return "done";
    }),
  );

  // C-CONC-03: keyed step concurrency (JS sends the single-object shape).
  add(
    fn(
      { id: "flow-conc-key", concurrency: { limit: 1, key: "event.data.num" } },
      { event: "conf/flow-conc-key" },
      async ({ event, step, runId }) => {
        const num = event.data.num;
        await step.run("work", () =>
          busy(["flow-conc-key", `flow-conc-key:${num}`], event.data.ms ?? 2000, ["flow-conc-key", { run: runId, num }]),
        );
        return num;
      },
    ),
  );

  // C-CONC-04: a function-wide limit of 2 plus a keyed limit of 1 (two-entry array shape).
  add(
    fn(
      {
        id: "flow-conc-key-fn",
        retries: 0,
        concurrency: [{ limit: 2 }, { limit: 1, key: "event.data.num" }],
      },
      { event: "conf/flow-conc-key-fn" },
      async ({ event, step, runId }) => {
        const num = event.data.num;
        await step.run("work", () =>
          busy(["flow-conc-key-fn", `flow-conc-key-fn:${num}`], event.data.ms ?? 1500, [
            "flow-conc-key-fn",
            { run: runId, num },
          ]),
        );
        return num;
      },
    ),
  );

  // C-CONC-05: two functions share one account-scoped limit of 1 (key 'global').
  for (const suffix of ["a", "b"]) {
    const id = `flow-conc-acct-${suffix}`;
    add(
      fn(
        { id, concurrency: [{ limit: 1, scope: "account", key: "'global'" }] },
        { event: "conf/flow-conc-acct" },
        async ({ event, step, runId }) => {
          await step.run("work", () =>
            busy(["flow-conc-acct", id], event.data.ms ?? 1000, ["flow-conc-acct", { run: runId, fn: id }]),
          );
          return id;
        },
      ),
    );
  }

  // C-THR-01: throttled run starts (limit 1 burst 0 every 2 s; limit 1 burst 1 every 4 s).
  for (const [id, throttle] of [
    ["flow-throttle-b0", { limit: 1, period: "2s", burst: 0 }],
    ["flow-throttle-b1", { limit: 1, period: "4s", burst: 1 }],
  ]) {
    add(
      fn({ id, throttle }, { event: `conf/${id}` }, async ({ event, step, runId }) => {
        await step.run("mark", () => {
          record(id, { t: Date.now(), run: runId, i: event.data.i ?? null });
          return "marked";
        });
        return "done";
      }),
    );
  }

  // C-THR-02: throttle per key; the two steps (ids "b", "b:1") are not throttled.
  add(
    fn(
      { id: "flow-throttle-key", throttle: { key: "event.data.id", limit: 1, period: "6s", burst: 0 } },
      { event: "conf/flow-throttle-key" },
      async ({ event, step, runId }) => {
        for (let n = 0; n < 2; n++) {
          await step.run("b", () => {
            record("flow-throttle-key", { t: Date.now(), run: runId, id: event.data.id, n });
            return n;
          });
        }
        return event.data.id;
      },
    ),
  );

  // C-RL-01: rate limit 1 per 24 h per event.data.number; excess runs are skipped.
  add(
    fn(
      { id: "flow-rate-limit", rateLimit: { limit: 1, period: "24h", key: "event.data.number" } },
      { event: "conf/flow-rate-limit" },
      async ({ event, step, runId }) => {
        await step.run("count", () => {
          record("flow-rate-limit", { t: Date.now(), run: runId, number: event.data.number ?? null });
          return "counted";
        });
        return event.data.number ?? null;
      },
    ),
  );

  // C-FAIL-03: a rate-limited function that always fails, and a failure handler with the
  // same rateLimit whose key (event.data.number) is missing on the failure event: off.
  add(
    fn(
      {
        id: "flow-rl-failed",
        retries: 0,
        rateLimit: { limit: 1, period: "24h", key: "event.data.number" },
      },
      { event: "conf/flow-rl-failed" },
      async ({ event, runId }) => {
        bump("flow-rl-failed");
        record("flow-rl-failed", { run: runId, number: event.data.number ?? null });
        throw new NonRetriableError("failed");
      },
    ),
  );
  add(
    fn(
      { id: "flow-rl-failed-handler", rateLimit: { limit: 1, period: "24h", key: "event.data.number" } },
      { event: "inngest/function.failed", if: "event.data.function_id == 'conformance-flow-rl-failed'" },
      async ({ event }) => {
        bump("flow-rl-failed-handler");
        record("flow-rl-failed-handler", { failed_run: event.data.run_id ?? null });
        return "handled";
      },
    ),
  );

  // idempotency: at most one run per event.data.order per 24 h.
  add(
    fn({ id: "flow-idempotency", idempotency: "event.data.order" }, { event: "conf/flow-idempotency" }, async ({ event, step, runId }) => {
      await step.run("count", () => {
        record("flow-idempotency", { t: Date.now(), run: runId, order: event.data.order ?? null });
        return "counted";
      });
      return event.data.order ?? null;
    }),
  );

  // C-DEB-01/02: debounce per event.data.name, 2 s; the run sees the last event.
  add(
    fn(
      { id: "flow-debounce", debounce: { key: "event.data.name", period: "2s" } },
      { event: "conf/flow-debounce" },
      async ({ event, step, runId }) => {
        const name = await step.run("get name", () => {
          record("flow-debounce", { t: Date.now(), run: runId, name: event.data.name, counter: event.data.counter ?? null });
          return event.data.name;
        });
        return { name, counter: event.data.counter ?? null };
      },
    ),
  );

  // C-DEB-03: no key; the event with the latest ts wins.
  add(
    fn({ id: "flow-debounce-ts", debounce: { period: "2s" } }, { event: "conf/flow-debounce-ts" }, async ({ event, step, runId }) => {
      await step.run("get name", () => {
        record("flow-debounce-ts", { t: Date.now(), run: runId, name: event.data.name });
        return event.data.name;
      });
      return event.data.name;
    }),
  );

  // C-DEB-04: a steady stream never goes quiet for 2 s; the 4 s timeout forces a start.
  add(
    fn(
      { id: "flow-debounce-timeout", debounce: { period: "2s", timeout: "4s" } },
      { event: "conf/flow-debounce-timeout" },
      async ({ event, step, runId }) => {
        await step.run("mark", () => {
          record("flow-debounce-timeout", { t: Date.now(), run: runId, counter: event.data.counter ?? null });
          return "marked";
        });
        return event.data.counter ?? null;
      },
    ),
  );

  // C-PRIO-01: one at a time; "high" jumps 5 s ahead in the backlog.
  add(
    fn(
      {
        id: "flow-priority",
        concurrency: [{ limit: 1 }],
        priority: { run: "event.data.priority == 'high' ? 5 : 0" },
      },
      { event: "conf/flow-priority" },
      async ({ event, step, runId }) => {
        await step.run("work", () =>
          busy(["flow-priority"], event.data.ms ?? 2000, ["flow-priority", { run: runId, priority: event.data.priority }]),
        );
        return event.data.priority;
      },
    ),
  );

  // C-SING-01/02: singleton skip per event.data.user.id (a key of false switches it off).
  add(
    fn(
      { id: "flow-singleton-skip", singleton: { key: "event.data.user.id", mode: "skip" } },
      { event: "conf/flow-singleton-skip" },
      async ({ event, step, runId }) => {
        await step.run("work", () =>
          busy(["flow-singleton-skip"], event.data.ms ?? 2000, ["flow-singleton-skip", { run: runId, i: event.data.i ?? null }]),
        );
        return "done";
      },
    ),
  );

  // C-SING-03: singleton cancel per key: step, 4 s sleep, return true.
  add(
    fn(
      { id: "flow-singleton-cancel", singleton: { key: "event.data.user.id", mode: "cancel" } },
      { event: "conf/flow-singleton-cancel" },
      async ({ event, step, runId }) => {
        await step.run("counter1", () => {
          bump("flow-singleton-cancel");
          record("flow-singleton-cancel", { t: Date.now(), run: runId, i: event.data.i ?? null });
          return "counted";
        });
        await step.sleep("sleep", "4s");
        return true;
      },
    ),
  );

  // C-SING-05/06: singleton without a key, skip and cancel, with a 3 s sleep.
  for (const mode of ["skip", "cancel"]) {
    const id = `flow-singleton-${mode}-nokey`;
    add(
      fn({ id, singleton: { mode } }, { event: `conf/${id}` }, async ({ event, step, runId }) => {
        await step.run("start", () => {
          record(id, { t: Date.now(), run: runId, i: event.data.i ?? null });
          return "started";
        });
        await step.sleep("zzz", "3s");
        return "done";
      }),
    );
  }

  // Lifecycle events of the singleton-cancel functions.
  add(
    fn(
      { id: "flow-singleton-cancelled" },
      {
        event: "inngest/function.cancelled",
        if: "event.data.function_id == 'conformance-flow-singleton-cancel' || event.data.function_id == 'conformance-flow-singleton-cancel-nokey'",
      },
      async ({ event }) => {
        bump("flow-singleton-cancelled");
        record("flow-singleton-cancelled", { fn: event.data.function_id ?? null, run: event.data.run_id ?? null });
        return "noted";
      },
    ),
  );
  add(
    fn(
      { id: "flow-singleton-finished" },
      {
        event: "inngest/function.finished",
        if: "event.data.function_id == 'conformance-flow-singleton-cancel' && event.data.result == true",
      },
      async ({ event }) => {
        bump("flow-singleton-finished");
        record("flow-singleton-finished", { run: event.data.run_id ?? null });
        return "noted";
      },
    ),
  );

  // C-BATCH-01/04/07: batches (size, `if`, key). No steps: the handler runs once per run.
  for (const [id, batchEvents] of [
    ["flow-batch", { maxSize: 5, timeout: "5s" }],
    ["flow-batch-if", { maxSize: 5, timeout: "5s", if: "int(event.data.num) % 2 == 0" }],
    ["flow-batch-key", { maxSize: 3, timeout: "5s", key: "event.data.userId" }],
  ]) {
    add(
      fn({ id, batchEvents }, { event: `conf/${id}` }, async ({ events, runId }) => {
        const nums = events.map((e) => e.data.num ?? null);
        const users = events.map((e) => e.data.userId ?? null);
        record(id, { t: Date.now(), run: runId, nums, users });
        return { count: events.length, nums, users };
      }),
    );
  }

  // C-INV-07: invoking a rate-limited function; the second invoke must fail at once.
  const rlInvokee = add(
    fn(
      { id: "flow-rl-invokee", retries: 0, rateLimit: { limit: 1, period: "1m" } },
      { event: "conf/flow-rl-invokee.never" },
      async ({ runId }) => {
        bump("flow-rl-invokee");
        record("flow-rl-invokee", { run: runId });
        return "invoked";
      },
    ),
  );
  add(
    fn({ id: "flow-rl-invoker", retries: 0 }, { event: "conf/flow-rl-invoker" }, async ({ step }) => {
      await step.run("send", () => "sent");
      const res = await step.invoke("call", { function: rlInvokee, data: {}, timeout: "60s" });
      return { child: res };
    }),
  );

  // cron-tick: only with CONF_CRON set, so an unsupported schedule cannot break other cases.
  if (process.env.CONF_CRON) {
    add(
      fn({ id: "cron-tick" }, { cron: process.env.CONF_CRON }, async ({ event }) => {
        bump("cron-tick");
        record("cron-tick", { name: event.name, cron: event.data?.cron ?? null });
        return "tick";
      }),
    );
  }

  const handler = serve({ client, functions });
  const port = Number(process.env.PORT || 3000);
  const server = http.createServer((req, res) => {
    if (req.url === "/counters") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ counters, records, gauges }));
      return;
    }
    if (req.url.startsWith("/api/inngest")) return handler(req, res);
    res.writeHead(404);
    res.end("not found");
  });
  server.listen(port, "127.0.0.1", () => {
    console.log(`js${major} fixture app on http://127.0.0.1:${port}/api/inngest (${functions.length} functions)`);
  });
  return server;
}
