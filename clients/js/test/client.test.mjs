// The JavaScript client against a real chatd (started by tests/test_js_client.py,
// which passes its address in CHATD_URL): node --test clients/js/test/
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, test } from "node:test";

import { ChatdClient, ChatdError } from "../chatd-client.js";

const URL = process.env.CHATD_URL;
if (!URL) throw new Error("CHATD_URL is not set: run through tests/test_js_client.py");

// Each test is bounded: a lost frame fails it instead of hanging the suite.
const T = { timeout: 20000 };

const clients = [];
after(() => clients.forEach((c) => c.close()));

async function connected(user, options = {}) {
  const c = new ChatdClient(URL, { user, backoffInitialMs: 50, backoffMaxMs: 500, ...options });
  clients.push(c);
  await c.connect();
  return c;
}

const conv = () => `js-${randomUUID().slice(0, 8)}`;

/** Resolves with the first event of `type` whose detail satisfies `pred`. */
function next(client, type, pred = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${type} within ${ms} ms`)), ms);
    const on = (e) => {
      if (!pred(e.detail)) return;
      clearTimeout(timer);
      client.removeEventListener(type, on);
      resolve(e.detail);
    };
    client.addEventListener(type, on);
  });
}

/** Resolves once `pred()` holds, checking on every event of `type`. */
async function until(client, type, pred, ms = 10000) {
  if (pred()) return;
  await next(client, type, () => pred(), ms);
}

function record(client, type) {
  const got = [];
  client.addEventListener(type, (e) => got.push(e.detail));
  return got;
}

test("a message sent on one client reaches the other once, in seq order", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const bob = await connected("bob");
  await bob.subscribe(c);
  const seen = record(bob, "message");
  const acks = [];
  for (const text of ["one", "two", "three"]) acks.push(await ann.send(c, text));
  assert.deepEqual(
    acks.map((a) => a.seq),
    [1, 2, 3],
  );
  await until(bob, "message", () => seen.length === 3);
  assert.deepEqual(
    seen.map((d) => [d.message.seq, d.message.text, d.message.user]),
    [
      [1, "one", "ann"],
      [2, "two", "ann"],
      [3, "three", "ann"],
    ],
  );
  assert.equal(bob.conversation(c).lastSeq, 3);
});

test("the same id sent twice is stored once and acked with its seq", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const first = await ann.send(c, "hello", { id: "m-1" });
  const again = await ann.send(c, "hello", { id: "m-1" });
  assert.equal(first.duplicate, false);
  assert.equal(again.duplicate, true);
  assert.equal(again.seq, first.seq);
});

test("a streaming reply grows token by token and locks to the committed message", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  await ann.subscribe(c);
  const growth = [];
  ann.addEventListener("reply", (e) => growth.push(e.detail.reply.text));
  const ack = await ann.send(c, "tell me", { reply: true });
  assert.ok(ack.stream, "the ack names the reply");
  const end = await next(ann, "replyend", (d) => d.reply.stream === ack.stream);
  await until(ann, "message", () => ann.conversation(c).lastSeq >= ack.seq + 1);
  const reply = ann.conversation(c).replies.get(ack.stream);
  const stored = ann.conversation(c).messages.find((m) => m.id === ack.stream);
  assert.equal(end.reply.status, "complete");
  assert.equal(reply.text, stored.text, "the bubble holds exactly the committed text");
  const distinct = new Set(growth.filter((t) => t.length > 0));
  assert.ok(distinct.size > 3, `the text grew in steps (${distinct.size})`);
  for (const t of distinct) assert.ok(stored.text.startsWith(t), `each step is a prefix: ${t}`);
});

test("stop ends a reply as stopped on every client", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const bob = await connected("bob");
  await ann.subscribe(c);
  await bob.subscribe(c);
  const ack = await ann.send(c, "a long one", { reply: true });
  await next(bob, "reply", (d) => d.reply.stream === ack.stream && d.reply.text.length > 0);
  const ends = [ann, bob].map((x) => next(x, "replyend", (d) => d.reply.stream === ack.stream));
  await bob.stop(c, ack.stream);
  for (const end of await Promise.all(ends)) assert.equal(end.reply.status, "stopped");
  await until(ann, "message", () => ann.conversation(c).messages.some((m) => m.id === ack.stream));
  const stored = ann.conversation(c).messages.find((m) => m.id === ack.stream);
  assert.equal(stored.status, "stopped");
});

test("dropped mid-reply: the client resumes and ends with exactly the committed text", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const bob = await connected("bob");
  await bob.subscribe(c);
  const states = record(bob, "state");
  const seen = record(bob, "message");
  await ann.send(c, "before");
  const ack = await ann.send(c, "go on", { reply: true });
  await next(bob, "reply", (d) => d.reply.stream === ack.stream && d.reply.text.length > 5);
  const resumed = next(bob, "resumed");
  bob.dropConnection();
  // Sent while bob is away: he gets it after resuming, once.
  await ann.send(c, "while you were out");
  await resumed;
  await next(bob, "replyend", (d) => d.reply.stream === ack.stream);
  await until(bob, "message", () => seen.some((d) => d.message.id === ack.stream));
  await until(bob, "message", () => seen.length === 4);
  const stored = bob.conversation(c).messages.find((m) => m.id === ack.stream);
  assert.equal(bob.conversation(c).replies.get(ack.stream).text, stored.text);
  const seqs = seen.map((d) => d.message.seq);
  assert.deepEqual(seqs, [1, 2, 3, 4].slice(0, seqs.length), "each seq once, in order");
  assert.ok(
    states.some((s) => s.state === "reconnecting") && states.at(-1).state === "live",
    JSON.stringify(states),
  );
});

test("a send made while disconnected is delivered after the reconnect, once", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const bob = await connected("bob");
  await bob.subscribe(c);
  const seen = record(bob, "message");
  const reconnecting = next(ann, "state", (d) => d.state === "reconnecting");
  ann.dropConnection();
  await reconnecting;
  const ack = await ann.send(c, "queued while away");
  assert.equal(ack.seq, 1);
  await until(bob, "message", () => seen.length === 1);
  assert.equal(seen[0].message.text, "queued while away");
});

test("typing reaches the other users, not the typist", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  const bob = await connected("bob");
  await ann.subscribe(c);
  await bob.subscribe(c);
  const mine = record(ann, "typing");
  const got = next(bob, "typing");
  ann.typing(c);
  assert.deepEqual(await got, { conv: c, user: "ann" });
  assert.deepEqual(mine, []);
});

test("a name the server refuses fails connect with its code, and the client stops", T, async () => {
  const bad = new ChatdClient(URL, { user: " spaced " });
  clients.push(bad);
  await assert.rejects(bad.connect(), (err) => err instanceof ChatdError && err.code === "bad_field");
  assert.equal(bad.state, "closed");
});

test("history pages back through older messages", T, async () => {
  const c = conv();
  const ann = await connected("ann");
  for (let i = 1; i <= 5; i++) await ann.send(c, `m${i}`);
  const page = await ann.history(c, { before: 5, limit: 2 });
  assert.deepEqual(
    page.messages.map((m) => m.text),
    ["m3", "m4"],
  );
  assert.equal(page.more, true);
});
