// Follows a chatd conversation with the official Durable Streams client and
// prints one JSON line per message: {"seq": n, "id": "...", "offset": "..."}.
// Exits once it has seen DS_WANT messages. Used by tests/test_durable_streams.py
// (the client must ride through a chatd restart on its own).
import { stream } from "@durable-streams/client"

const url = process.env.DS_URL
const want = Number(process.env.DS_WANT)
const live = process.env.DS_LIVE === "long-poll" ? "long-poll" : "sse"
let seen = 0

const res = await stream({
  url,
  offset: process.env.DS_OFFSET || "-1",
  live,
  backoffOptions: { initialDelay: 50, maxDelay: 500, multiplier: 2, debug: !!process.env.DS_DEBUG },
  // Retry whatever fails (a server restarting): the offset makes it exact.
  onError: () => ({}),
})
res.subscribeJson(async (batch) => {
  for (const item of batch.items) {
    console.log(JSON.stringify({ seq: item.seq, id: item.id, offset: batch.offset }))
    seen += 1
  }
  if (seen >= want) process.exit(0)
})
