// @ts-check
// chatd's page: sign in, conversations, live messages, streaming replies with
// stop, typing, the connection's state, and (with an operator token) the
// break switch. Everything goes through chatd-client.js; no framework, no build.
import { ChatdClient } from "/web/chatd-client.js";

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/** @type {ChatdClient|null} */
let chat = null;
/** @type {string|null} */
let current = null;
/** @type {Map<string, ReturnType<typeof setTimeout>>} */
const typists = new Map();
let operatorToken = "";
let scheduled = false;

const STORE = "chatd.convs";
const convs = () => /** @type {string[]} */ (JSON.parse(localStorage.getItem(STORE) || "[]"));

/** @param {string} conv */
function remember(conv) {
  const all = convs().filter((c) => c !== conv);
  localStorage.setItem(STORE, JSON.stringify([conv, ...all].slice(0, 50)));
}

const STATES = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  closed: "disconnected",
};

/** @param {SubmitEvent} e */
async function signIn(e) {
  e.preventDefault();
  const name = /** @type {HTMLInputElement} */ ($("name")).value.trim();
  const token = /** @type {HTMLInputElement} */ ($("token")).value.trim();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
  const client = new ChatdClient(url, token ? { token } : { user: name || "guest" });
  client.addEventListener("state", (ev) => {
    const state = /** @type {CustomEvent} */ (ev).detail.state;
    const el = $("connection");
    el.dataset.state = state;
    el.textContent = /** @type {Record<string, string>} */ (STATES)[state] ?? state;
  });
  for (const type of ["message", "reply", "replyend", "replyerror"]) {
    client.addEventListener(type, (ev) => {
      if (/** @type {CustomEvent} */ (ev).detail.conv === current) render();
    });
  }
  client.addEventListener("typing", (ev) => showTyping(/** @type {CustomEvent} */ (ev).detail));
  client.addEventListener("unsubscribed", (ev) => {
    $("signin-error").textContent = `left ${/** @type {CustomEvent} */ (ev).detail.conv}`;
  });
  $("signin-error").textContent = "";
  try {
    await client.connect();
  } catch (err) {
    $("signin-error").textContent = err instanceof Error ? err.message : String(err);
    return;
  }
  chat = client;
  $("signin").hidden = true;
  $("chat").hidden = false;
  listConvs();
  const first = convs()[0];
  if (first) await open(first);
}

function listConvs() {
  const ul = $("convs");
  ul.replaceChildren(
    ...convs().map((conv) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = conv;
      b.setAttribute("aria-current", String(conv === current));
      b.addEventListener("click", () => open(conv));
      li.append(b);
      return li;
    }),
  );
}

/** @param {string} conv */
async function open(conv) {
  if (!chat) return;
  current = conv;
  remember(conv);
  listConvs();
  $("conv-title").textContent = conv;
  $("composer").hidden = false;
  $("typing").textContent = "";
  render();
  try {
    await chat.subscribe(conv);
  } catch (err) {
    $("signin-error").textContent = err instanceof Error ? err.message : String(err);
  }
  render();
}

/** Re-render the open conversation, at most once a frame. */
function render() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    draw();
  });
}

function draw() {
  if (!chat || !current) return;
  const { messages, replies } = chat.conversation(current);
  const committed = new Set(messages.map((m) => m.id));
  /** @type {[string, string, string, string, string, boolean][]} */
  const want = messages.map((m) => [m.id, m.user, m.role, m.text, m.status, false]);
  for (const r of replies.values()) {
    // A reply shows as a live bubble until its message commits (then it is that
    // message); one that ended with nothing stored disappears.
    if (committed.has(r.stream) || r.error) continue;
    want.push([r.stream, "assistant", "assistant", r.text, r.done ? r.status ?? "" : "", !r.done]);
  }
  // Keyed by id: a token changes one bubble's text, nothing else is rebuilt
  // (and assistive technology hears additions, not the whole list again).
  const list = $("messages");
  /** @type {Map<string, HTMLElement>} */
  const have = new Map();
  for (const li of /** @type {HTMLElement[]} */ ([...list.children])) have.set(li.dataset.id ?? "", li);
  let at = /** @type {Element|null} */ (list.firstElementChild);
  for (const [id, user, role, text, status, streaming] of want) {
    let li = have.get(id);
    const key = `${role}|${status}|${streaming}`;
    if (!li || li.dataset.key !== key) {
      const fresh = bubble(id, user, role, text, status, streaming);
      fresh.dataset.key = key;
      if (li) {
        li.replaceWith(fresh);
        // The bubble replaced may be the insertion point itself: the point is
        // now the fresh one (the old is detached, no longer a place to insert).
        if (at === li) at = fresh;
      }
      li = fresh;
    } else {
      const body = /** @type {HTMLElement} */ (li.querySelector(".text"));
      if (body.textContent !== text) body.textContent = text;
    }
    have.delete(id);
    if (li !== at) list.insertBefore(li, at);
    at = li.nextElementSibling;
  }
  for (const li of have.values()) li.remove();
}

/**
 * @param {string} id @param {string} user @param {string} role @param {string} text
 * @param {string} status @param {boolean} streaming
 */
function bubble(id, user, role, text, status, streaming) {
  const li = document.createElement("li");
  li.dataset.id = id;
  li.className = role + (streaming ? " streaming" : "");
  if (streaming) li.setAttribute("aria-busy", "true");
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = user;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who);
  if (streaming) li.append(stopButton(id), " ");
  li.append(body);
  if (status && status !== "complete") {
    const s = document.createElement("span");
    s.className = "status";
    s.textContent = `(${status})`;
    li.append(s);
  }
  return li;
}

/**
 * The Stop button of a streaming reply. It sits before the growing text, not
 * after it: a button that moves with every token is one a click misses.
 * @param {string} id
 */
function stopButton(id) {
  const stop = document.createElement("button");
  stop.type = "button";
  stop.className = "stop";
  stop.textContent = "Stop";
  stop.setAttribute("aria-label", "Stop this reply");
  const conv = /** @type {string} */ (current);
  stop.addEventListener("click", async () => {
    if (!chat) return;
    stop.disabled = true;
    stop.textContent = "Stopping…";
    stop.title = "";
    try {
      await chat.stop(conv, id);
    } catch (err) {
      // Say why (the reply ended meanwhile, or the client was closed; a
      // connection that blinks does not land here, the stop waits for it)
      // and let the user try again.
      stop.disabled = false;
      stop.textContent = "Stop";
      stop.title = err instanceof Error ? err.message : String(err);
    }
  });
  return stop;
}

/** @param {SubmitEvent} e */
async function send(e) {
  e.preventDefault();
  if (!chat || !current) return;
  const box = /** @type {HTMLTextAreaElement} */ ($("text"));
  const text = box.value.trim();
  if (!text) return;
  box.value = "";
  const reply = /** @type {HTMLInputElement} */ ($("askreply")).checked;
  try {
    await chat.send(current, text, { reply });
  } catch (err) {
    $("signin-error").textContent = err instanceof Error ? err.message : String(err);
  }
}

/** @param {{conv: string, user: string}} t */
function showTyping({ conv, user }) {
  if (conv !== current) return;
  clearTimeout(typists.get(user));
  typists.set(
    user,
    setTimeout(() => {
      typists.delete(user);
      drawTyping();
    }, 3000),
  );
  drawTyping();
}

function drawTyping() {
  const names = [...typists.keys()];
  $("typing").textContent = names.length ? `${names.join(", ")} typing…` : "";
}

// -- the operator panel -------------------------------------------------------

/** @param {string} path @param {object} [body] */
async function operator(path, body) {
  const res = await fetch(path, {
    method: body ? "POST" : "GET",
    headers: { authorization: `Bearer ${operatorToken}`, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error ?? `HTTP ${res.status}`);
  return data;
}

async function chaosStatus() {
  try {
    $("chaos").textContent = JSON.stringify(await operator("/chaos"), null, 1);
    $("operator-error").textContent = "";
  } catch (err) {
    $("operator-error").textContent = err instanceof Error ? err.message : String(err);
  }
}

/** @param {SubmitEvent} e */
async function useOperatorToken(e) {
  e.preventDefault();
  operatorToken = /** @type {HTMLInputElement} */ ($("opkey")).value.trim();
  try {
    await operator("/chaos");
  } catch (err) {
    $("operator-error").textContent = err instanceof Error ? err.message : String(err);
    return;
  }
  $("switch").hidden = false;
  await chaosStatus();
  setInterval(chaosStatus, 1000);
}

/** @param {object} [body] @param {string} path */
async function flip(path, body) {
  try {
    await operator(path, body ?? {});
  } catch (err) {
    $("operator-error").textContent = err instanceof Error ? err.message : String(err);
  }
  await chaosStatus();
}

$("signin").addEventListener("submit", signIn);
$("composer").addEventListener("submit", send);
$("text").addEventListener("input", () => current && chat?.typing(current));
$("text").addEventListener("keydown", (e) => {
  // Enter sends, Shift+Enter is a new line.
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    /** @type {HTMLFormElement} */ ($("composer")).requestSubmit();
  }
});
$("newconv").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("convname"));
  const conv = input.value.trim();
  input.value = "";
  if (conv) open(conv);
});
$("optoken").addEventListener("submit", useOperatorToken);
for (const b of document.querySelectorAll("[data-break]")) {
  b.addEventListener("click", () => {
    const seconds = Number(/** @type {HTMLInputElement} */ ($("seconds")).value) || 10;
    flip("/chaos/break", { component: /** @type {HTMLElement} */ (b).dataset.break, seconds });
  });
}
$("heal").addEventListener("click", () => flip("/chaos/heal"));
