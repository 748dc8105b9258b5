// The client's own rules, against a scripted server (no network): what it
// sends on a reconnect, and what it makes of repeated, overlapping or missing
// frames, which a real chatd sends only under faults.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ChatdClient } from "../chatd-client.js";

const T = { timeout: 5000 };

/** A WebSocket the test plays the server of. */
class FakeSocket {
  static last = null;
  /** The scripted server's answer to a subscribe: (socket, frame) => void. */
  static onSubscribe = null;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(data) {
    const frame = JSON.parse(data);
    this.sent.push(frame);
    if (frame.op === "hello") this.reply({ type: "welcome", user: frame.user, protocol: 1, ref: frame.ref });
    if (frame.op === "subscribe") FakeSocket.onSubscribe?.(this, frame);
  }
  reply(frame) {
    queueMicrotask(() => this.onmessage?.({ data: JSON.stringify(frame) }));
  }
  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
}

async function live(onSubscribe) {
  FakeSocket.onSubscribe = onSubscribe;
  const c = new ChatdClient("ws://fake/", { user: "ann", WebSocket: FakeSocket, backoffInitialMs: 1 });
  const ready = c.connect();
  const ws = FakeSocket.last;
  await ready;
  return { c, ws };
}

const msg = (seq, text, id = `m${seq}`) => ({
  type: "message",
  conv: "c1",
  seq,
  id,
  user: "bob",
  role: id.startsWith("~") ? "assistant" : "user",
  status: "complete",
  text,
  ts: 1,
});

const tick = () => new Promise((r) => setTimeout(r, 5));

test("a message seen before is not delivered again", T, async () => {
  const { c, ws } = await live((ws, f) => ws.reply({ type: "snapshot", conv: "c1", messages: [msg(1, "a")], head: 1, ref: f.ref }));
  const got = [];
  c.addEventListener("message", (e) => got.push(e.detail.message.seq));
  await c.subscribe("c1");
  for (const f of [msg(2, "b"), msg(2, "b"), msg(1, "a"), msg(3, "c")]) ws.reply(f);
  await tick();
  assert.deepEqual(got, [1, 2, 3]);
  c.close();
});

test("deltas: a repeat is ignored, an overlap adds only what is new (code points), a hole waits for the message", T, async () => {
  const { c, ws } = await live((ws, f) => ws.reply({ type: "snapshot", conv: "c1", messages: [], head: 0, ref: f.ref }));
  await c.subscribe("c1");
  const d = (offset, text) => ({ type: "delta", conv: "c1", stream: "~r", offset, text });
  for (const f of [d(0, "h😀"), d(0, "h😀"), d(1, "😀 wo"), d(9, "far"), d(5, "rld")]) ws.reply(f);
  await tick();
  const reply = c.conversation("c1").replies.get("~r");
  assert.equal(reply.text, "h😀 world");
  ws.reply({ type: "stream.end", conv: "c1", stream: "~r", seq: 1, status: "complete", length: 10 });
  ws.reply(msg(1, "h😀 world!", "~r"));
  await tick();
  assert.equal(reply.done, true);
  assert.equal(reply.text, "h😀 world!", "the committed message is the truth");
  c.close();
});

test("a reconnect resubscribes from the cursor and the offsets it holds, then resends pending sends", T, async () => {
  let snapshots = 0;
  const { c, ws } = await live((sock, f) =>
    sock.reply({ type: "snapshot", conv: "c1", messages: snapshots++ ? [] : [msg(1, "a"), msg(2, "b")], head: 2, ref: f.ref }),
  );
  await c.subscribe("c1");
  ws.reply({ type: "delta", conv: "c1", stream: "~r", offset: 0, text: "né😀" });
  await tick();
  const resumed = new Promise((r) => c.addEventListener("resumed", r, { once: true }));
  ws.close(1006, "gone");
  await tick();
  const sending = c.send("c1", "later", { id: "m-9" }); // made while disconnected
  await resumed;
  const again = FakeSocket.last;
  assert.notEqual(again, ws);
  const sub = again.sent.find((f) => f.op === "subscribe");
  assert.deepEqual([sub.after, sub.streams], [2, { "~r": 3 }]);
  const send = again.sent.find((f) => f.op === "send");
  assert.equal(send.id, "m-9");
  // Postgres is down: retryable; the same frame (same id) goes again.
  again.reply({ type: "error", code: "unavailable", retryable: true, message: "down", ref: send.ref });
  await new Promise((r) => setTimeout(r, 30));
  const sends = again.sent.filter((f) => f.op === "send");
  assert.equal(sends.length, 2);
  assert.deepEqual(sends[1], sends[0]);
  again.reply({ type: "ack", conv: "c1", id: "m-9", seq: 3, ref: send.ref });
  assert.equal((await sending).seq, 3);
  c.close();
});

test("a stop asked while disconnected is sent after the reconnect; a refusal rejects it", T, async () => {
  const { c, ws } = await live((sock, f) =>
    sock.reply({ type: "snapshot", conv: "c1", messages: [], head: 0, ref: f.ref }),
  );
  await c.subscribe("c1");
  const resumed = new Promise((r) => c.addEventListener("resumed", r, { once: true }));
  /** @type {Promise<void>|undefined} */
  let stopping;
  c.addEventListener("state", (e) => {
    // Asked the moment the connection is lost, before the reconnect.
    if (!stopping && e.detail.state === "reconnecting") stopping = c.stop("c1", "~r1");
  });
  ws.close(1006, "gone");
  await resumed;
  assert.ok(stopping, "the stop was asked while reconnecting");
  assert.equal(ws.sent.filter((f) => f.op === "stop").length, 0, "not on the lost connection");
  const again = FakeSocket.last;
  const stop = again.sent.find((f) => f.op === "stop");
  assert.deepEqual([stop.conv, stop.stream], ["c1", "~r1"]);
  again.reply({ type: "stopping", conv: "c1", stream: "~r1", ref: stop.ref });
  await stopping;
  // A reply that has ended cannot be stopped: that is an answer, not a retry.
  const late = c.stop("c1", "~r2");
  await tick();
  const second = again.sent.filter((f) => f.op === "stop")[1];
  again.reply({ type: "error", code: "unknown_stream", retryable: false, message: "no reply", ref: second.ref });
  await assert.rejects(late, { code: "unknown_stream" });
  c.close();
});

test("a conversation the user may no longer read ends its subscription on reconnect", T, async () => {
  let first = true;
  const { c, ws } = await live((sock, f) => {
    if (first) {
      first = false;
      sock.reply({ type: "snapshot", conv: "c1", messages: [], head: 0, ref: f.ref });
    } else {
      sock.reply({ type: "error", code: "forbidden", retryable: false, message: "no grant", conv: "c1", ref: f.ref });
    }
  });
  await c.subscribe("c1");
  const ended = new Promise((r) => c.addEventListener("unsubscribed", (e) => r(e.detail), { once: true }));
  ws.close(1006, "gone");
  const detail = await ended;
  assert.equal(detail.conv, "c1");
  await new Promise((r) => c.addEventListener("resumed", r, { once: true }));
  assert.equal(c.state, "live");
  c.close();
});
