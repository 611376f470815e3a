// The sessionbridge page: plain modern JavaScript, no library, no build step.
//
// It speaks only the public /v1 API with the key a person pastes. Every piece of
// text that comes from the API is put into the page with textContent, never as
// markup, and the Content-Security-Policy forbids inline script besides.
"use strict";

const KEY_STORE = "sessionbridge.key";
// What the API does not repeat when the messages are listed again: the turn's
// ai_session and how its reply arrived, kept per reply id for this tab.
const TURNS_STORE = "sessionbridge.turns";
// Idempotency-Key of each failed question, so that Retry answers that same
// question instead of adding a second copy of it (docs/api.md).
const RETRY_STORE = "sessionbridge.retry";
const SESSION_PAGE = 20;
const MESSAGE_PAGE = 200;
const RESUME_DELAYS_MS = [250, 500, 1000, 2000, 4000];

const WORDS = {
  invalid_json: "The bridge could not read the request",
  invalid_field: "Something in the request is not valid",
  idempotency_mismatch: "This retry does not match the first request",
  unauthorized: "The bridge refused the API key",
  not_found: "Not found for this key",
  method_not_allowed: "The bridge does not allow this request",
  idempotency_in_progress: "This message is still being answered",
  too_large: "The request is too large",
  session_busy: "Too many messages are already waiting on this session",
  overloaded: "The bridge is at its limit of turns in flight",
  storage_unavailable: "The bridge's database cannot take the write now",
  upstream_error: "The AI server failed",
  upstream_empty_reply: "The AI server answered with an empty reply",
  upstream_unavailable: "The AI server cannot be reached",
  upstream_timeout: "The AI server did not answer in time",
  network_error: "The bridge cannot be reached",
  stream_lost: "The reply's stream was lost",
};

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  sessions: [],
  nextCursor: null,
  current: null, // the open Session
  messages: [],
  busy: false,
  live: null, // the turn being answered: {userText, replyText, pieces}
};

// -- small helpers ----------------------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function readStore(name) {
  try {
    return JSON.parse(sessionStorage.getItem(name) || "{}");
  } catch {
    return {};
  }
}

function writeStore(name, value) {
  sessionStorage.setItem(name, JSON.stringify(value));
}

function remember(name, id, value) {
  const all = readStore(name);
  if (value === undefined) delete all[id];
  else all[id] = value;
  writeStore(name, all);
}

// Random without crypto.randomUUID, which exists only in secure contexts.
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function timeNode(iso) {
  if (!iso) return null;
  const when = new Date(iso);
  const shown = Number.isNaN(when.getTime())
    ? iso
    : when.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  return el("time", { datetime: iso, title: iso, text: shown });
}

// -- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || "request failed");
    this.status = status;
    this.code = problem.code || (status ? "http_" + status : "network_error");
    this.problem = problem;
    this.retryAfter = retryAfter;
  }

  describe() {
    const words = WORDS[this.code] || this.problem.title || "The request failed";
    const parts = [words];
    const detail = this.problem.detail;
    if (Array.isArray(this.problem.errors) && this.problem.errors.length) {
      parts.push(this.problem.errors.map((e) => `${e.field}: ${e.message}`).join("; "));
    } else if (detail && detail !== words) {
      parts.push(detail);
    }
    let text = parts.join(": ");
    text += this.status ? ` (code ${this.code}, HTTP ${this.status})` : ` (code ${this.code})`;
    if (this.retryAfter) text += `. Try again in ${this.retryAfter} s.`;
    return text;
  }
}

async function problemOf(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    problem = { title: response.statusText };
  }
  if (typeof problem !== "object" || problem === null) problem = {};
  return new ApiError(response.status, problem, response.headers.get("Retry-After"));
}

function networkError(error) {
  return new ApiError(0, { code: "network_error", detail: String(error.message || error) });
}

async function call(method, path, { body, headers = {}, accept = "application/json" } = {}) {
  const init = {
    method,
    headers: { Authorization: "Bearer " + state.key, Accept: accept, ...headers },
    cache: "no-store",
    credentials: "omit", // the key travels in the header only, never in a cookie
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw networkError(error);
  }
  if (!response.ok) {
    const error = await problemOf(response);
    if (error.status === 401) forgetKey(error);
    throw error;
  }
  return response;
}

async function callJson(method, path, options) {
  const response = await call(method, path, options);
  return response.status === 204 ? null : response.json();
}

// -- server-sent events (docs/streaming.md) ---------------------------------------------------

// Reads one text/event-stream body and calls onEvent({event, data, id}) for each
// event. EventSource cannot send the Authorization header, hence fetch.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "", data: [], id: null };
  const dispatch = () => {
    if (event.data.length || event.event) {
      let data = event.data.join("\n");
      try {
        data = JSON.parse(data);
      } catch {
        /* kept as text */
      }
      onEvent({ event: event.event || "message", data, id: event.id });
    }
    event = { event: "", data: [], id: null };
  };
  const line = (text) => {
    if (text === "") return dispatch();
    if (text.startsWith(":")) return undefined; // a comment: keep-alive
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event.event = value;
    else if (field === "data") event.data.push(value);
    else if (field === "id") event.id = value;
    return undefined;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // A lone "\r" at the end may be the first half of "\r\n": wait for more.
    const lines = buffer.split(/\r\n|\n|\r(?!$)/);
    buffer = lines.pop();
    for (const text of lines) line(text);
  }
  if (buffer !== "") line(buffer.replace(/\r$/, ""));
}

// -- views ------------------------------------------------------------------------------

function showAlert(message) {
  const box = $("alert");
  box.textContent = message;
  box.hidden = !message;
}

function setView(view) {
  document.body.dataset.view = view;
  const loggedIn = view !== "login";
  $("login").hidden = loggedIn;
  $("sessions").hidden = !loggedIn;
  $("key-status").hidden = !loggedIn;
  $("chat").hidden = !loggedIn || !state.current;
  $("placeholder").hidden = !loggedIn || !!state.current;
}

function forgetKey(error) {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  state.current = null;
  state.sessions = [];
  setView("login");
  if (error) showAlert(error.describe());
  $("key-input").focus();
}

function renderSessions() {
  const list = $("session-list");
  list.replaceChildren(
    ...state.sessions.map((session) => {
      const current = state.current && state.current.id === session.id;
      const button = el(
        "button",
        {
          type: "button",
          class: "session-item",
          "aria-current": current ? "true" : null,
          dataset: { id: session.id },
          onclick: () => openSession(session.id),
        },
        [
          el("strong", { class: "session-title", text: session.title || "Untitled session" }),
          el("span", { class: "snippet", text: session.scenario }),
          el("span", { class: "session-meta" }, [
            document.createTextNode(
              `${session.message_count} message${session.message_count === 1 ? "" : "s"} · `,
            ),
            timeNode(session.updated_at),
          ]),
        ],
      );
      return el("li", {}, [button]);
    }),
  );
  $("sessions-empty").hidden = state.sessions.length > 0;
  $("more-sessions").hidden = !state.nextCursor;
}

async function loadSessions({ more = false } = {}) {
  const query = new URLSearchParams({ limit: String(SESSION_PAGE) });
  if (more && state.nextCursor) query.set("cursor", state.nextCursor);
  const page = await callJson("GET", "/v1/sessions?" + query);
  state.sessions = more ? state.sessions.concat(page.sessions) : page.sessions;
  state.nextCursor = page.next_cursor;
  renderSessions();
}

function usageText(usage) {
  if (!usage || typeof usage !== "object") return null;
  const parts = [];
  if (usage.prompt_tokens != null) {
    let prompt = `${usage.prompt_tokens} prompt`;
    if (usage.cached_tokens != null) prompt += ` (${usage.cached_tokens} cached)`;
    parts.push(prompt);
  }
  if (usage.completion_tokens != null) parts.push(`${usage.completion_tokens} completion`);
  return parts.length ? "tokens: " + parts.join(", ") : null;
}

function messageNode(message, { streaming = false } = {}) {
  const turn = message.role === "assistant" ? readStore(TURNS_STORE)[message.id] || {} : {};
  const aiSession = message.ai_session || turn.ai_session;
  const usage = usageText(message.usage || turn.usage);
  const failed = message.status === "failed";
  const meta = el("div", { class: "meta" }, [
    el("span", { class: "seq", text: message.seq != null ? "#" + message.seq : "#…" }),
    el("span", { class: "role", text: message.role }),
    el("span", { class: "status status-" + message.status, text: message.status }),
    timeNode(message.created_at),
    aiSession
      ? el("span", { class: "ai-session ai-" + aiSession, text: "AI session " + aiSession })
      : null,
    turn.delivery ? el("span", { class: "delivery", text: turn.delivery }) : null,
    usage ? el("span", { class: "usage", text: usage }) : null,
  ]);
  const node = el(
    "li",
    {
      class: `message ${message.role}${failed ? " failed" : ""}${streaming ? " streaming" : ""}`,
      dataset: { id: message.id || "", seq: message.seq ?? "", status: message.status },
    },
    [meta, el("p", { class: "text", text: message.content })],
  );
  if (failed) {
    node.append(
      el("div", { class: "failure" }, [
        el("span", {
          text: message.error
            ? `Not answered (${message.error}): this question failed.`
            : "Not answered: this question failed.",
        }),
        el("button", {
          type: "button",
          class: "retry",
          text: "Retry",
          onclick: () => retry(message),
        }),
      ]),
    );
  }
  return node;
}

function renderMessages() {
  const list = $("messages");
  const nodes = state.messages.map((message) => messageNode(message));
  if (state.live) {
    nodes.push(state.live.userNode);
    if (state.live.replyNode) nodes.push(state.live.replyNode);
  }
  list.replaceChildren(...nodes);
  if (!nodes.length) list.append(el("li", { class: "hint", text: "No messages yet." }));
  list.lastElementChild?.scrollIntoView({ block: "end" });
}

function renderSessionHead() {
  const session = state.current;
  $("chat-title").textContent = session.title || "Untitled session";
  $("scenario-text").textContent = session.scenario;
  const facts = [
    ["id", session.id],
    ["messages", String(session.message_count)],
    ["max_tokens", String(session.max_tokens)],
    ["created", timeNode(session.created_at)],
    ["updated", timeNode(session.updated_at)],
  ];
  $("session-facts").replaceChildren(
    ...facts.flatMap(([name, value]) => [
      el("dt", { text: name }),
      el("dd", {}, [typeof value === "string" ? document.createTextNode(value) : value]),
    ]),
  );
}

async function loadMessages(sessionId) {
  let messages = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: String(MESSAGE_PAGE) });
    if (cursor) query.set("cursor", cursor);
    const page = await callJson(
      "GET",
      `/v1/sessions/${encodeURIComponent(sessionId)}/messages?${query}`,
    );
    messages = messages.concat(page.messages);
    cursor = page.next_cursor;
  } while (cursor);
  return messages;
}

async function refreshCurrent() {
  const id = state.current.id;
  const [session, messages] = await Promise.all([
    callJson("GET", `/v1/sessions/${encodeURIComponent(id)}`),
    loadMessages(id),
  ]);
  if (!state.current || state.current.id !== id) return;
  state.current = session;
  state.messages = messages;
  const index = state.sessions.findIndex((s) => s.id === id);
  if (index >= 0) state.sessions[index] = session;
  renderSessionHead();
  renderMessages();
  renderSessions();
}

async function openSession(id, { focus = true } = {}) {
  showAlert("");
  const known = state.sessions.find((s) => s.id === id);
  state.current = known || { id, title: "", scenario: "", message_count: 0 };
  state.messages = [];
  state.live = null;
  if (location.hash !== "#session=" + id) history.replaceState(null, "", "#session=" + id);
  // A wide window has room for the session's facts; a phone keeps them folded.
  $("session-about").open = window.matchMedia("(min-width: 760px)").matches;
  setView("chat");
  renderSessionHead();
  renderMessages();
  renderSessions();
  try {
    await refreshCurrent();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 404) closeSession();
    showAlert(error.describe());
    return;
  }
  if (focus) $("composer-input").focus();
}

function closeSession() {
  state.current = null;
  state.messages = [];
  history.replaceState(null, "", location.pathname);
  setView("list");
  renderSessions();
}

// -- a turn -----------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  for (const button of document.querySelectorAll(".retry")) button.disabled = busy;
}

function startLive(content) {
  state.live = {
    userNode: messageNode({ role: "user", content, status: "pending" }),
    replyNode: null,
    replyText: "",
    pieces: 0,
    lastDeltaId: 0,
    userMessage: null,
    outcome: null, // {result} or {problem}
  };
  renderMessages();
}

function onTurnEvent(live, { event, data, id }) {
  if (event === "turn.started" && data && data.user_message) {
    live.userMessage = data.user_message;
    live.userNode.replaceWith((live.userNode = messageNode(data.user_message)));
  } else if (event === "reply.delta" && data && typeof data.text === "string") {
    const deltaId = Number.parseInt(id, 10);
    // After a resume the server may repeat what this page already holds.
    if (Number.isFinite(deltaId) && deltaId <= live.lastDeltaId) return;
    live.lastDeltaId = Number.isFinite(deltaId) ? deltaId : live.lastDeltaId + 1;
    live.replyText += data.text;
    live.pieces += 1;
    const reply = { role: "assistant", content: live.replyText, status: "answered" };
    const node = messageNode(reply, { streaming: true });
    if (live.replyNode) live.replyNode.replaceWith(node);
    else $("messages").append(node);
    live.replyNode = node;
    node.scrollIntoView({ block: "end" });
  } else if (event === "turn.completed") {
    live.outcome = { result: data };
  } else if (event === "turn.failed") {
    live.outcome = { problem: data };
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Follows a turn whose stream broke off: GET .../events, from after the last
// delta this page holds (docs/streaming.md). The turn itself goes on at the bridge.
async function resume(sessionId, live) {
  for (const delay of RESUME_DELAYS_MS) {
    if (live.outcome || !live.userMessage) return;
    await sleep(delay);
    const headers = {};
    if (live.lastDeltaId > 0) headers["Last-Event-ID"] = String(live.lastDeltaId);
    const path =
      `/v1/sessions/${encodeURIComponent(sessionId)}` +
      `/messages/${encodeURIComponent(live.userMessage.id)}/events`;
    try {
      const response = await call("GET", path, { headers, accept: "text/event-stream" });
      await readEvents(response, (event) => onTurnEvent(live, event));
    } catch (error) {
      if (error instanceof ApiError && error.status !== 0) return;
    }
  }
}

async function sendTurn(content, idempotencyKey) {
  const session = state.current;
  const path = `/v1/sessions/${encodeURIComponent(session.id)}/messages`;
  startLive(content);
  const live = state.live;
  let response;
  try {
    response = await call("POST", path, {
      body: { content },
      // Until the bridge streams, it answers this with plain JSON: both are read.
      accept: "text/event-stream, application/json;q=0.5",
      headers: { "Idempotency-Key": idempotencyKey },
    });
  } catch (error) {
    return { error };
  }
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    return { result: await response.json(), delivery: "not streamed" };
  }
  try {
    await readEvents(response, (event) => onTurnEvent(live, event));
  } catch {
    /* the stream broke off: resumed below */
  }
  if (!live.outcome) await resume(session.id, live);
  const delivery = `streamed in ${live.pieces} piece${live.pieces === 1 ? "" : "s"}`;
  if (live.outcome && live.outcome.result) return { result: live.outcome.result, delivery };
  if (live.outcome && live.outcome.problem) {
    const problem = live.outcome.problem;
    return { error: new ApiError(problem.status || 0, problem), userMessage: live.userMessage };
  }
  return {
    error: new ApiError(0, { code: "stream_lost", detail: "reloaded the stored messages" }),
    userMessage: live.userMessage,
  };
}

async function send(content, idempotencyKey = newIdempotencyKey()) {
  if (state.busy || !state.current) return;
  showAlert("");
  setBusy(true);
  const sessionId = state.current.id;
  try {
    const outcome = await sendTurn(content, idempotencyKey);
    if (outcome.result) {
      const { reply, ai_session: aiSession } = outcome.result;
      remember(TURNS_STORE, reply.id, {
        ai_session: reply.ai_session || aiSession,
        usage: reply.usage,
        delivery: outcome.delivery,
      });
      if (outcome.result.user_message) remember(RETRY_STORE, outcome.result.user_message.id);
    } else {
      showAlert(outcome.error.describe());
      if (outcome.error.status === 401) return;
    }
    state.live = null;
    if (state.current && state.current.id === sessionId) {
      await refreshCurrent();
      if (outcome.error) rememberRetry(content, idempotencyKey, outcome.userMessage);
    }
  } catch (error) {
    state.live = null;
    if (!(error instanceof ApiError)) throw error;
    showAlert(error.describe());
  } finally {
    state.live = null;
    setBusy(false);
  }
}

// A failed question keeps the Idempotency-Key it was sent with, so Retry asks
// the bridge to try that same question again.
function rememberRetry(content, idempotencyKey, userMessage) {
  const failed = userMessage
    ? state.messages.find((m) => m.id === userMessage.id && m.status === "failed")
    : state.messages.findLast((m) => m.role === "user" && m.status === "failed");
  if (failed && failed.content === content) remember(RETRY_STORE, failed.id, idempotencyKey);
}

function retry(message) {
  const key = readStore(RETRY_STORE)[message.id];
  send(message.content, key || newIdempotencyKey());
}

// -- start ------------------------------------------------------------------------------

async function useKey(key) {
  state.key = key;
  try {
    await loadSessions();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status !== 401) showAlert(error.describe());
    return false;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("key-label").textContent = "key …" + key.slice(-4);
  showAlert("");
  $("new-session").open = state.sessions.length === 0;
  setView("list");
  return true;
}

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    if (await useKey(key)) {
      $("key-input").value = "";
      (state.sessions.length ? document.querySelector(".session-item") : $("scenario-input"))
        ?.focus();
    }
  });
  $("forget-key").addEventListener("click", () => {
    showAlert("");
    forgetKey();
  });
  $("more-sessions").addEventListener("click", async () => {
    try {
      await loadSessions({ more: true });
    } catch (error) {
      if (error instanceof ApiError) showAlert(error.describe());
    }
  });
  $("new-session-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const scenario = $("scenario-input").value;
    const title = $("title-input").value.trim();
    const body = { scenario };
    if (title) body.title = title;
    try {
      const session = await callJson("POST", "/v1/sessions", { body });
      state.sessions.unshift(session);
      $("new-session-form").reset();
      $("new-session").open = false;
      await openSession(session.id);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      showAlert(error.describe());
    }
  });
  $("back").addEventListener("click", closeSession);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("composer-input");
    const content = input.value;
    if (!content.trim() || state.busy) return;
    input.value = "";
    send(content);
  });
  $("composer-input").addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter breaks the line; an input method composing
    // a character keeps its Enter.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    $("composer").requestSubmit();
  });
  window.addEventListener("hashchange", () => {
    const id = sessionFromHash();
    if (state.key && id && (!state.current || state.current.id !== id)) openSession(id);
  });
}

function sessionFromHash() {
  const match = /^#session=([^&]+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

async function start() {
  wire();
  const key = sessionStorage.getItem(KEY_STORE);
  if (!key) {
    setView("login");
    $("key-input").focus();
    return;
  }
  if (!(await useKey(key))) return;
  const id = sessionFromHash();
  if (id) await openSession(id, { focus: false });
}

start();
