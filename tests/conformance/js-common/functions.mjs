// The conformance fixture functions, shared by the inngest@3 and inngest@4 apps.
//
// This module imports nothing from `inngest` itself: each app passes in its own copy of the
// package (js3/ and js4/ pin different majors), so the very same function definitions run
// on both. py/app.py mirrors every function here with the same ids, events and outputs.
//
// Besides /api/inngest the server answers:
//   GET /counters  -> {"counters": {...}, "records": {...}}  (what the step bodies did)
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
      res.end(JSON.stringify({ counters, records }));
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
