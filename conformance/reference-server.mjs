// The Durable Streams reference server (@durable-streams/server), for `chatd bench
// durable` to measure chatd against on the same machine. DS_PORT: its port;
// DS_DATA_DIR: file-backed storage there (omit: in memory). Prints one line,
// "listening on <url>", once it accepts.
import { DurableStreamTestServer } from "@durable-streams/server"

const server = new DurableStreamTestServer({
  port: Number(process.env.DS_PORT || 4437),
  host: "127.0.0.1",
  longPollTimeout: Number(process.env.DS_LONG_POLL_MS || 20000),
  dataDir: process.env.DS_DATA_DIR || undefined,
})
await server.start()
console.log(`listening on http://127.0.0.1:${process.env.DS_PORT || 4437}`)
process.on("SIGTERM", async () => {
  await server.stop()
  process.exit(0)
})
