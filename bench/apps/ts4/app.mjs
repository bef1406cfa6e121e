// The founding function on the official inngest@4 SDK, the same work as the Rust apps:
// collect-data (SIZE bytes of random text), digest (first 100 chars), finalize.
// Serves /api/inngest on 127.0.0.1:$PORT; INNGEST_DEV / INNGEST_BASE_URL point it at Cairn.
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
const inngest = new Inngest({ id: "bench-ts4", logger: quiet });

const founding = inngest.createFunction(
  { id: "founding", retries: 0, triggers: [{ event: "bench/founding" }] },
  async ({ event, step }) => {
    const size = Number(event.data?.size ?? 1024);
    const big = await step.run("collect-data", () => randomText(size));
    const digest = await step.run("digest", () => big.slice(0, 100));
    await step.run("finalize", () => ({ done: true }));
    return { len: digest.length };
  },
);

const port = Number(process.env.PORT || 3000);
const server = http.createServer(serve({ client: inngest, functions: [founding] }));
server.listen(port, "127.0.0.1", () => console.log(`bench-ts4 on http://127.0.0.1:${port}/api/inngest`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
