// The chat page in a real browser (headless Chromium through playwright-core),
// against a real chatd started by tests/test_web_page.py, which passes:
//   CHATD_HTTP (the page's address), CHATD_OPERATOR_TOKEN, CHROMIUM (its
//   executable) and CHATD_SCREENSHOTS (a directory for a PNG of each step).
// The page is loaded through a TCP proxy in this process, so a test can cut
// the page's connection the way a network (or a server) does.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { mkdirSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { after, afterEach, before, test } from "node:test";

import { chromium } from "playwright-core";

import { ChatdClient } from "../chatd-client.js";

const T = { timeout: 60000 };
const HTTP = new URL(/** @type {string} */ (process.env.CHATD_HTTP));
const SHOTS = process.env.CHATD_SCREENSHOTS ?? "screenshots";
mkdirSync(SHOTS, { recursive: true });

let browser;
let proxy;
const sockets = new Set();
const clients = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    // As root (CI) Chromium refuses to start sandboxed.
    args: process.getuid?.() === 0 ? ["--no-sandbox"] : [],
  });
  proxy = net.createServer((down) => {
    const up = net.connect(Number(HTTP.port), HTTP.hostname);
    for (const s of [down, up]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    down.pipe(up).pipe(down);
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
});

after(async () => {
  clients.forEach((c) => c.close());
  await browser?.close();
  proxy?.close();
  sockets.forEach((s) => s.destroy());
});

// An uncaught error in the page fails the test it happened in, even when the
// page recovered on its next render: a page that throws is a broken page.
const pageErrors = [];
afterEach(() => {
  assert.deepEqual(pageErrors.splice(0), [], "the page threw");
});

const pageUrl = () => `http://127.0.0.1:${proxy.address().port}/`;

/** Every connection through the proxy cut at once, as a network failure would. */
function cutConnections() {
  const n = sockets.size;
  sockets.forEach((s) => s.destroy());
  return n;
}

async function signedIn(name, conv) {
  const page = await browser.newPage();
  page.on("pageerror", (err) => {
    console.error(`page error (${name}):`, err);
    pageErrors.push(`${name}: ${err.message}`);
  });
  await page.goto(pageUrl());
  await page.fill("#name", name);
  await page.click("#signin button[type=submit]");
  await page.waitForSelector('#connection[data-state="live"]');
  await page.fill("#convname", conv);
  await page.press("#convname", "Enter");
  await page.waitForFunction((c) => document.getElementById("conv-title")?.textContent === c, conv);
  return page;
}

/** A Node client on the same conversation: the committed truth to compare with. */
async function observer(conv) {
  const c = new ChatdClient(`ws://${HTTP.host}/`, { user: "observer" });
  clients.push(c);
  await c.connect();
  await c.subscribe(conv);
  return c;
}

async function sendFrom(page, text, reply) {
  await page.setChecked("#askreply", reply);
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

const bubbles = (page) =>
  page.$$eval("#messages li", (lis) =>
    lis.map((li) => ({
      id: li.dataset.id,
      text: li.querySelector(".text")?.textContent ?? "",
      streaming: li.classList.contains("streaming"),
      status: li.querySelector(".status")?.textContent ?? "",
    })),
  );

/** The id of the reply bubble once it streams (the latest assistant bubble). */
async function streamingReply(page) {
  const handle = await page.waitForSelector("#messages li.streaming .text:not(:empty)");
  return handle.evaluate((el) => /** @type {HTMLElement} */ (el.parentElement).dataset.id);
}

/** Samples the bubble's text until it is committed (no longer streaming). */
async function watchReply(page, id, ms = 30000) {
  const seen = [];
  const deadline = Date.now() + ms;
  for (;;) {
    const b = (await bubbles(page)).find((x) => x.id === id);
    if (b && seen.at(-1) !== b.text) seen.push(b.text);
    if (b && !b.streaming) return { final: b, seen };
    assert.ok(Date.now() < deadline, `reply ${id} not committed within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function committed(obs, conv, id) {
  for (let i = 0; i < 500; i++) {
    const m = obs.conversation(conv).messages.find((x) => x.id === id);
    if (m) return m;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`message ${id} never committed`);
}

const shot = (page, name) => page.screenshot({ path: join(SHOTS, `${name}.png`) });

test("a message sent on one page appears on the other, once", T, async () => {
  const conv = `web-${randomUUID().slice(0, 8)}`;
  const ann = await signedIn("ann", conv);
  const bob = await signedIn("bob", conv);
  await sendFrom(ann, "hello from ann", false);
  await bob.waitForFunction(() => document.querySelectorAll("#messages li").length === 1);
  await new Promise((r) => setTimeout(r, 300)); // nothing else arrives
  const got = await bubbles(bob);
  assert.deepEqual(
    got.map((b) => b.text),
    ["hello from ann"],
  );
  await shot(bob, "1-message-on-both-pages");
  await ann.close();
  await bob.close();
});

test("a streaming reply renders token by token and locks to the committed message", T, async () => {
  const conv = `web-${randomUUID().slice(0, 8)}`;
  const obs = await observer(conv);
  const ann = await signedIn("ann", conv);
  await sendFrom(ann, "tell me a story", true);
  const id = await streamingReply(ann);
  await shot(ann, "2-reply-streaming");
  const { final, seen } = await watchReply(ann, id);
  const stored = await committed(obs, conv, id);
  assert.equal(final.text, stored.text, "the bubble holds exactly the committed text");
  assert.ok(seen.length > 5, `the bubble grew in steps (${seen.length})`);
  for (const t of seen) assert.ok(stored.text.startsWith(t), `every step is a prefix: ${t}`);
  await shot(ann, "3-reply-committed");
  await ann.close();
});

test("stop ends a reply as stopped on both pages", T, async () => {
  const conv = `web-${randomUUID().slice(0, 8)}`;
  const ann = await signedIn("ann", conv);
  const bob = await signedIn("bob", conv);
  // Long enough (80 s at the server's 25 tokens/s) that the click lands while
  // it streams however slow the machine: a reply that completes first would
  // end "complete" and say nothing about stop.
  await sendFrom(ann, "go on and on #tokens=2000", true);
  const id = await streamingReply(bob);
  await bob.click(`#messages li[data-id="${id}"] button.stop`);
  // The click landed and the server took it: the button says "Stopping…"
  // until the reply ends, or carries the server's refusal in its title.
  const clicked = await bob.waitForFunction(
    (i) => {
      const li = document.querySelector(`#messages li[data-id="${i}"]`);
      if (!li?.classList.contains("streaming")) return "ended";
      const button = /** @type {HTMLButtonElement|null} */ (li.querySelector("button.stop"));
      if (button?.title) return `refused: ${button.title}`;
      return button?.disabled ? "stopping" : false;
    },
    id,
    { timeout: 10000 },
  );
  assert.doesNotMatch(String(await clicked.jsonValue()), /^refused/);
  for (const [name, page] of [["ann", ann], ["bob", bob]]) {
    const { final } = await watchReply(page, id);
    assert.equal(final.status, "(stopped)", `${name}'s bubble: ${JSON.stringify(final)}`);
  }
  await shot(ann, "4-reply-stopped");
  await ann.close();
  await bob.close();
});

test("the page's connection cut mid-reply: it reconnects and ends with exactly the committed text", T, async () => {
  const conv = `web-${randomUUID().slice(0, 8)}`;
  const obs = await observer(conv);
  const ann = await signedIn("ann", conv);
  await sendFrom(ann, "a long answer please", true);
  const id = await streamingReply(ann);
  await new Promise((r) => setTimeout(r, 200));
  assert.ok(cutConnections() > 0, "the page had a connection to cut");
  await ann.waitForSelector('#connection[data-state="reconnecting"]');
  await shot(ann, "5-reconnecting");
  await ann.waitForSelector('#connection[data-state="live"]');
  const { final } = await watchReply(ann, id);
  const stored = await committed(obs, conv, id);
  assert.equal(final.text, stored.text, "nothing missing or doubled");
  const ids = (await bubbles(ann)).map((b) => b.id);
  assert.equal(new Set(ids).size, ids.length, "each message once");
  await shot(ann, "6-resumed-and-committed");
  await ann.close();
});

test("Redis broken from the operator panel mid-reply: the animation freezes, the message still appears", T, async () => {
  const conv = `web-${randomUUID().slice(0, 8)}`;
  const obs = await observer(conv);
  const ann = await signedIn("ann", conv);
  await ann.fill("#opkey", /** @type {string} */ (process.env.CHATD_OPERATOR_TOKEN));
  await ann.press("#opkey", "Enter");
  await ann.waitForSelector("#switch:not([hidden])");
  await ann.fill("#seconds", "3");
  await sendFrom(ann, "keep talking", true);
  const id = await streamingReply(ann);
  await ann.click('button[data-break="redis"]');
  await ann.waitForFunction(() => document.getElementById("chaos")?.textContent?.includes("redis"));
  await new Promise((r) => setTimeout(r, 300)); // what was in flight lands
  const frozen = (await bubbles(ann)).find((b) => b.id === id);
  await new Promise((r) => setTimeout(r, 1000));
  const later = (await bubbles(ann)).find((b) => b.id === id);
  assert.ok(frozen?.streaming, "the reply was still streaming when Redis broke");
  assert.equal(later?.text, frozen.text, "no token arrives while Redis is broken");
  await shot(ann, "7-redis-broken-frozen");
  const { final } = await watchReply(ann, id);
  const stored = await committed(obs, conv, id);
  assert.equal(final.text, stored.text);
  await shot(ann, "8-after-redis-healed");
  await ann.close();
});
