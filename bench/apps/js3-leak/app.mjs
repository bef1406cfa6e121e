// The founding report's pattern (inngest-js#1440) on inngest@3.52.4: a long-lived holder of
// the run context. Every call's `ctx` goes into a global list that is never emptied, as the
// Effect runtime's fiber set did. The function is the founding function.
//
// GET /heap runs two forced GCs (node --expose-gc) and answers {"live_bytes": heapUsed}.
import http from "node:http";
import { Inngest } from "inngest";
import { serve } from "inngest/node";

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
function randomText(n) {
  const bytes = new Uint8Array(n);
  for (let i = 0; i < n; i++) bytes[i] = ALPHABET.charCodeAt((Math.random() * 64) | 0);
  return Buffer.from(bytes).toString("latin1");
}

const quiet = { info() {}, warn() {}, error: console.error, debug() {} };
const inngest = new Inngest({ id: "bench-leak-js3", logger: quiet });
const stash = [];

const founding = inngest.createFunction(
  { id: "founding", retries: 0 },
  { event: "bench/founding" },
  async (ctx) => {
    stash.push({ ctx });
    const { event, step } = ctx;
    const size = Number(event.data?.size ?? 1024);
    const big = await step.run("collect-data", () => randomText(size));
    const digest = await step.run("digest", () => big.slice(0, 100));
    await step.run("finalize", () => ({ done: true }));
    return { len: digest.length };
  },
);

const handler = serve({ client: inngest, functions: [founding] });
const port = Number(process.env.PORT || 3000);
const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/heap") {
    if (global.gc) { global.gc(); global.gc(); }
    const m = process.memoryUsage();
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ live_bytes: m.heapUsed, rss: m.rss, stashed: stash.length, gc: Boolean(global.gc) }));
    return;
  }
  return handler(req, res);
});
server.listen(port, "127.0.0.1", () => console.log(`bench-leak-js3 on http://127.0.0.1:${port}/api/inngest`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
