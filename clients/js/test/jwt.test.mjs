// JWT mode against a real chatd (tests/test_js_client.py starts one with
// [auth].mode = "jwt", leeway 0, and passes CHATD_JWT_URL and CHATD_JWT_SECRET):
// tokens come from getToken, and a short-lived one is refreshed on the live
// connection before it expires.
import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { after, test } from "node:test";

import { ChatdClient, ChatdError } from "../chatd-client.js";

const URL = process.env.CHATD_JWT_URL;
const SECRET = process.env.CHATD_JWT_SECRET;
if (!URL || !SECRET) throw new Error("CHATD_JWT_URL/SECRET unset: run through tests/test_js_client.py");

const clients = [];
after(() => clients.forEach((c) => c.close())); // a failed test leaves no reconnect loop

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");

/** An HS256 token for `sub`, valid `seconds`, granting read and write on js-*. */
function token(sub, seconds, secret = SECRET) {
  const head = b64({ alg: "HS256", typ: "JWT" });
  const now = Math.floor(Date.now() / 1000);
  const body = b64({ sub, exp: now + seconds, iat: now, chatd: { convs: { "js-*": "rw" } } });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

test("a 3-second token is refreshed on the live connection (no reconnect)", { timeout: 20000 }, async () => {
  let issued = 0;
  const c = new ChatdClient(URL, {
    getToken: async () => {
      issued += 1;
      return token("carol", 3);
    },
  });
  clients.push(c);
  const states = [];
  c.addEventListener("state", (e) => states.push(e.detail.state));
  await c.connect();
  const conv = `js-${randomUUID().slice(0, 8)}`;
  await c.subscribe(conv);
  // Past the first token's expiry (at most 3 s): without a refresh the server closes with 4003.
  await new Promise((r) => setTimeout(r, 4500));
  const ack = await c.send(conv, "still here");
  assert.equal(ack.seq, 1);
  assert.ok(issued >= 3, `tokens fetched: ${issued}`);
  assert.deepEqual(states, ["connecting", "live"], "never reconnected");
  assert.equal(c.user, "carol");
  c.close();
});

test("a token the server refuses rejects connect with its code", { timeout: 10000 }, async () => {
  const c = new ChatdClient(URL, { token: token("mallory", 60, "not-the-secret-at-all-0123456789") });
  clients.push(c);
  await assert.rejects(c.connect(), (err) => err instanceof ChatdError && err.code === "unauthorized");
  assert.equal(c.state, "closed");
});
