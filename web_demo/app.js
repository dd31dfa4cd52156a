// The live-playback page: edit a dialogue, press Play, hear it while it is being made. Or type
// while it speaks: each finished word goes to the server as it is typed (a turn opened with
// `stream: true`, its words in `text` messages), Enter ends the line (docs/protocol.md "Text that
// streams in").
// Tests read window.vibecast.stats; every control has a data-testid.

import { decode, encode } from "./msgpack.js";
import { Player } from "./player.js";

const COLORS = ["#e4572e", "#2e86ab", "#5b8c1a", "#a23b72"];
const LINE = /^\s*speaker\s+(\d+)\s*:\s*(.*?)\s*$/i;
const params = new URLSearchParams(location.search);
const token = params.get("token");

const el = (id) => document.getElementById(id);
const stats = {
  state: "idle",
  ttfa_ms: null,
  played_samples: 0,
  received_samples: 0,
  underruns: 0,
  current_turn: -1,
  session_samples: null,
  lead_ms: 0,
  rtf: null,
  decoder: "",
  stop_silence_ms: null,
  audio_after_cancel: 0,
  highlighted: [], // turns in the order they were highlighted
  underrun_at: [], // played_samples at each underrun
  closed_code: null, // the WebSocket's close code once it closed
  speakers: [], // as the server resolved them (ready.speakers)
  error: null,
  from_turn: 0, // the turn this take's audio starts at (after an edit: the first changed one)
  text_streaming: null, // ready.model.text_streaming: the server speaks words as they come
  typed: [], // type-while-it-speaks lines: {turn, speaker, text (sent so far), spoken (turn_end.text)}
};
window.vibecast = { stats };

let voices = [];
const speakerSettings = new Map(); // script speaker number -> {name, voice, upload}
let script = { turns: [], errors: [], speakers: [] };
let session = null;
let lastTake = null; // what the last Play sent: {voices, turns}, to find the first changed line

// Type while it speaks: the page's speakers are Speaker 1..4; one line (turn) is open at a time.
const TYPING_SPEAKERS = [1, 2, 3, 4];
const typing = {
  on: false,
  open: null, // index of the open line's turn, while its text is being typed
  outbox: [], // messages typed before `ready` (the server takes `text` only after it)
};

const player = new Player(onWorklet, onFirstAudio, (message) => fail("internal", message));

// -- the script ---------------------------------------------------------------------------------

function parse(text) {
  const turns = [];
  const errors = [];
  text.split("\n").forEach((raw, line) => {
    if (!raw.trim() || raw.trim().startsWith("#")) return;
    const m = raw.match(LINE);
    if (!m) errors.push({ line, message: `line ${line + 1}: expected "Speaker N: text"` });
    else if (!m[2]) errors.push({ line, message: `line ${line + 1}: Speaker ${m[1]} has nothing to say` });
    else turns.push({ number: Number(m[1]), text: m[2], line });
  });
  // One rule with engine/script.py (docs/protocol.md "Scripts as text"): the distinct numbers,
  // sorted ascending, are speakers 0, 1, 2, ... The comparator matters: sort() alone is by text.
  const numbers = [...new Set(turns.map((t) => t.number))].sort((a, b) => a - b);
  for (const t of turns) t.speaker = numbers.indexOf(t.number);
  return { turns, errors, speakers: numbers };
}

function colorOf(speaker) {
  return COLORS[speaker % COLORS.length];
}

function renderTurns() {
  if (typing.on) {
    renderTyped();
    return;
  }
  const list = el("turns");
  list.replaceChildren();
  script.turns.forEach((t, i) => {
    const li = document.createElement("li");
    li.dataset.testid = `turn-${i}`;
    li.style.setProperty("--c", colorOf(t.speaker));
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = speakerSettings.get(t.number)?.name || `Speaker ${t.number}`;
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = t.text;
    li.append(who, what);
    list.append(li);
  });
  for (const e of script.errors) {
    const li = document.createElement("li");
    li.className = "parse-error";
    li.textContent = e.message;
    list.append(li);
  }
}

function renderSpeakers() {
  const box = el("speakers");
  box.replaceChildren();
  script.speakers.forEach((number, i) => {
    if (!speakerSettings.has(number)) {
      speakerSettings.set(number, { name: `Speaker ${number}`, voice: voices[i % Math.max(1, voices.length)]?.id, upload: null });
    }
    const s = speakerSettings.get(number);
    const row = document.createElement("div");
    row.className = "speaker";
    row.style.setProperty("--c", colorOf(i));
    const dot = document.createElement("span");
    dot.className = "dot";
    const name = document.createElement("input");
    name.value = s.name;
    name.setAttribute("aria-label", `name of speaker ${number}`);
    name.oninput = () => { s.name = name.value; renderTurns(); renderTypingSpeakers(); };
    const select = document.createElement("select");
    select.setAttribute("aria-label", `voice of speaker ${number}`);
    for (const v of voices) {
      const o = new Option(v.name, v.id, false, v.id === s.voice && !s.upload);
      o.title = v.description;
      select.append(o);
    }
    const uploadOption = new Option(s.upload ? `⤒ ${s.upload.name}` : "⤒ Upload a voice…", "__upload", false, !!s.upload);
    select.append(uploadOption);
    const file = document.createElement("input");
    file.type = "file";
    file.accept = ".wav,.ogg,.opus,audio/wav,audio/ogg";
    file.hidden = true;
    file.onchange = async () => {
      const f = file.files[0];
      if (!f) return;
      s.upload = { name: f.name, bytes: new Uint8Array(await f.arrayBuffer()), format: /\.wav$/i.test(f.name) ? "wav" : "ogg" };
      renderSpeakers();
    };
    select.onchange = () => {
      if (select.value === "__upload") file.click();
      else { s.voice = select.value; s.upload = null; }
    };
    row.append(dot, name, select, file);
    box.append(row);
  });
  renderTypingSpeakers();
  if (script.speakers.length > 4) {
    const warn = document.createElement("p");
    warn.className = "warn";
    warn.textContent = `${script.speakers.length} speakers: the server takes at most 4.`;
    box.append(warn);
  }
}

function update() {
  script = typing.on ? { turns: [], errors: [], speakers: TYPING_SPEAKERS } : parse(el("script").value);
  renderSpeakers();
  renderTurns();
}

// -- the session ---------------------------------------------------------------------------------

function setState(state, text) {
  stats.state = state;
  const s = el("status");
  s.textContent = text || state;
  s.dataset.state = state;
  const busy = ["connecting", "queued", "playing", "stopping"].includes(state);
  // Play stays pressable while a take plays: edit a line, press Play, and the new take starts.
  el("play").disabled = typing.on || state === "connecting" || state === "stopping";
  el("stop").disabled = !busy;
}

function fail(code, message, turn) {
  stats.error = { code, message, turn };
  const box = el("error");
  box.hidden = false;
  box.textContent = message;
  if (turn !== undefined && turn !== null) {
    const li = document.querySelector(`[data-testid="turn-${turn}"]`);
    if (li) { li.classList.add("bad"); li.scrollIntoView({ block: "nearest" }); }
  }
}

function wsUrl() {
  const url = new URL("v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

// The first turn that differs from the last take (the turns before it come from the server's
// turn cache: docs/turn-cache.md); 0 when the voices changed or nothing did.
function firstChange(voicesKey, turns) {
  if (!lastTake || lastTake.voices !== voicesKey) return 0;
  const n = Math.min(lastTake.turns.length, turns.length);
  let i = 0;
  while (i < n && lastTake.turns[i].speaker === turns[i].speaker && lastTake.turns[i].text === turns[i].text) i++;
  return i === turns.length ? 0 : i;
}

// Leave the take that is playing: the server cancels it; its finished turns stay in the cache.
function abandon() {
  const old = session;
  if (!old || !old.ws) return;
  session = null;
  clearInterval(old.ticker);
  if (old.ws.readyState === WebSocket.OPEN) old.ws.send(encode({ type: "cancel" }));
  old.ws.close();
}

async function play() {
  update();
  if (!script.turns.length) {
    fail("bad_field", script.errors[0]?.message || "Write at least one line like: Speaker 1: Hello.");
    return;
  }
  abandon();
  el("error").hidden = true;
  document.querySelectorAll("#turns li").forEach((li) => li.classList.remove("bad", "current", "made"));
  const speakers = sessionSpeakers();
  const turns = script.turns.map((t) => ({ speaker: t.speaker, text: t.text }));
  const voicesKey = JSON.stringify(speakers.map((s) => s.voice || `${s.voice_format}:${s.voice_audio.length}:${s.name}`));
  const from = el("play-from").value === "top" ? 0 : firstChange(voicesKey, turns);
  lastTake = { voices: voicesKey, turns };
  const start = { type: "start", speakers, turns, format: { codec: "opus", sample_rate: 48000 } };
  if (from > 0) start.options = { from_turn: from };
  await begin(start, from);
}

function sessionSpeakers() {
  return script.speakers.map((number) => {
    const s = speakerSettings.get(number);
    return s.upload
      ? { name: s.name, voice_audio: s.upload.bytes, voice_format: s.upload.format }
      : { name: s.name, voice: s.voice };
  });
}

// A new session: its socket, the player, the counters. Runs inside the click or key handler
// that asked for it, up to its first await: browsers start audio only on a user gesture.
async function begin(start, from = 0) {
  Object.assign(stats, { ttfa_ms: null, played_samples: 0, received_samples: 0, underruns: 0, current_turn: -1,
    session_samples: null, lead_ms: 0, rtf: null, stop_silence_ms: null, audio_after_cancel: 0, highlighted: [],
    underrun_at: [], closed_code: null, speakers: [], error: null });
  session = { pressed: performance.now(), turnStarts: [], id: null, cancelled: false, ws: null, ticker: null, stopAt: null, ready: false };
  setState("connecting", "connecting…");
  player.reset();
  const audioReady = player.open();
  stats.from_turn = from;
  const ws = new WebSocket(wsUrl(), "vibecast.v1");
  ws.binaryType = "arraybuffer";
  session.ws = ws;
  const mine = session;
  ws.onopen = () => ws.send(encode(start));
  try {
    await audioReady;
  } catch (e) {
    fail("internal", `This browser cannot play audio here: ${e.message}`);
    ws.close();
    setState("error");
  }
  ws.onmessage = (e) => { if (session === mine) handle(decode(new Uint8Array(e.data))); };
  ws.onclose = (e) => {
    if (session !== mine) return;
    stats.closed_code = e.code;
    clearInterval(mine.ticker);
    typing.open = null; // the next key typed starts a new session
    if (["connecting", "queued", "playing"].includes(stats.state) && stats.session_samples === null) {
      fail("closed", `The connection closed (${e.code}${e.reason ? ": " + e.reason : ""}) before the dialogue was complete.`);
      setState("error");
    }
  };
  session.ticker = setInterval(() => {
    if (ws.readyState === WebSocket.OPEN && stats.state === "playing") {
      ws.send(encode({ type: "playback", played_ms: Math.floor(stats.played_samples / 48) }));
    }
  }, 500);
}

function handle(m) {
  switch (m.type) {
    case "ready":
      session.id = m.session_id;
      session.ready = true;
      stats.speakers = m.speakers;
      stats.text_streaming = !!m.model.text_streaming;
      if (typing.on) {
        el("typing-note").textContent = stats.text_streaming
          ? "This server speaks your words as they come; Enter ends the line."
          : "This server speaks each line when you press Enter (its model needs a line's whole text).";
        for (const out of typing.outbox.splice(0)) session.ws.send(encode(out));
      }
      player.configure(m.format.pre_skip).then(() => {
        stats.decoder = player.kind;
        el("decoder").textContent = `Decoding with ${player.kind} · ${m.model.name}`;
      }, (e) => fail("internal", e.message));
      setState("playing", stats.from_turn ? `playing from line ${stats.from_turn + 1}` : "playing");
      enableDownload();
      break;
    case "queued":
      setState("queued", `queued: ${m.position} ahead${m.eta_s ? `, about ${Math.round(m.eta_s)} s` : ""}`);
      break;
    case "turn_start":
      session.turnStarts[m.turn] = m.pts;
      document.querySelector(`[data-testid="turn-${m.turn}"]`)?.classList.add("made");
      break;
    case "turn_end":
      if (typing.on && stats.typed[m.turn]) {
        stats.typed[m.turn].spoken = m.text ?? stats.typed[m.turn].text;
        renderTyped();
        player.drain(); // the next line may be a while: play this one out now
      }
      break;
    case "audio":
      if (session.cancelled) { stats.audio_after_cancel += 1; return; }
      stats.received_samples += m.samples;
      if (player.decoder) player.decode(m.packets || []);
      else queueUntilReady(m.packets || []);
      break;
    case "progress":
      stats.rtf = m.rtf;
      break;
    case "error":
      fail(m.code, m.message, m.turn);
      if (m.fatal || stats.state === "connecting") setState("error", "error");
      break;
    case "cancelled":
      session.cancelled = true;
      setState("stopped", "stopped");
      break;
    case "done":
      stats.session_samples = m.samples;
      if (m.stats && m.stats.rtf !== undefined) stats.rtf = m.stats.rtf;
      whenDecoderReady(() => player.end(m.samples));
      break;
  }
  paint();
}

// `ready` configures the decoder asynchronously (the WASM one loads first): hold packets until then.
let pending = [];
function queueUntilReady(packets) {
  pending.push(...packets);
  whenDecoderReady(() => { const p = pending; pending = []; player.decode(p); });
}
function whenDecoderReady(fn) {
  if (player.decoder) { fn(); return; }
  const wait = setInterval(() => { if (player.decoder) { clearInterval(wait); fn(); } }, 5);
}

function stop() {
  if (!session || !session.ws) return;
  session.stopAt = performance.now();
  setState("stopping", "stopping…");
  if (session.ws.readyState === WebSocket.OPEN) session.ws.send(encode({ type: "cancel" }));
  player.stop();
}

function onFirstAudio() {
  if (session && stats.ttfa_ms === null) {
    stats.ttfa_ms = Math.round(performance.now() - session.pressed);
    paint();
  }
}

function onWorklet(w) {
  if (!session) return;
  if (w.state === "stopped") {
    if (session.stopAt !== null) stats.stop_silence_ms = Math.round(performance.now() - session.stopAt);
    return;
  }
  stats.played_samples = w.played;
  if (w.state === "underrun") stats.underrun_at.push(w.played);
  stats.underruns = w.underruns;
  stats.lead_ms = Math.round(w.buffered / 48);
  const starts = session.turnStarts;
  let current = -1;
  for (let i = 0; i < starts.length; i++) if (starts[i] !== undefined && starts[i] <= w.played) current = i;
  if (current !== stats.current_turn && current >= 0 && w.played > 0) highlight(current);
  if (w.state === "finished") {
    setState("done", "done");
    clearInterval(session.ticker);
  }
  paint();
}

function highlight(turn) {
  stats.current_turn = turn;
  stats.highlighted.push(turn);
  document.querySelectorAll("#turns li.current").forEach((li) => li.classList.remove("current"));
  const li = document.querySelector(`[data-testid="turn-${turn}"]`);
  if (li) {
    li.classList.add("current");
    li.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }
}

// -- type while it speaks --------------------------------------------------------------------------

function setTypingMode(on) {
  abandon();
  if (on === typing.on) return;
  typing.on = on;
  typing.open = null;
  typing.outbox = [];
  stats.typed = [];
  el("typing").hidden = !on;
  el("script").hidden = on;
  el("script-hint").hidden = on;
  el("play").disabled = on;
  el("play-from").disabled = on;
  el("submit-job").disabled = on;
  el("error").hidden = true;
  el("typing-input").value = "";
  el("typing-sent").textContent = "";
  el("turns").replaceChildren();
  setState("idle", "ready");
  update();
  if (on) el("typing-input").focus();
}

function renderTypingSpeakers() {
  const select = el("typing-speaker");
  const chosen = select.value || "0";
  select.replaceChildren(...TYPING_SPEAKERS.map((number, i) =>
    new Option(speakerSettings.get(number)?.name || `Speaker ${number}`, String(i), false, String(i) === chosen)));
}

function renderTyped() {
  const list = el("turns");
  stats.typed.forEach((t) => {
    let li = list.querySelector(`[data-testid="turn-${t.turn}"]`);
    if (!li) {
      li = document.createElement("li");
      li.dataset.testid = `turn-${t.turn}`;
      li.style.setProperty("--c", colorOf(t.speaker));
      const who = document.createElement("span");
      who.className = "who";
      const what = document.createElement("span");
      what.className = "what";
      li.append(who, what);
      list.append(li);
    }
    li.querySelector(".who").textContent = speakerSettings.get(TYPING_SPEAKERS[t.speaker])?.name || `Speaker ${t.speaker + 1}`;
    li.querySelector(".what").textContent = t.spoken ?? t.text;
    li.classList.toggle("open", t.turn === typing.open);
  });
}

function sendTyped(message) {
  if (session && session.ready && session.ws.readyState === WebSocket.OPEN) session.ws.send(encode(message));
  else typing.outbox.push(message);
}

// The first key of a line opens its turn: the first line of a session in its `start`, the
// next ones with an `append` (the server takes one open turn at a time).
function openLine() {
  const speaker = Number(el("typing-speaker").value || 0);
  const live = session && session.ws && session.ws.readyState <= WebSocket.OPEN &&
    !["error", "stopping", "stopped"].includes(stats.state);
  const turn = { speaker, text: "", stream: true };
  if (!live) {
    abandon();
    stats.typed = [];
    typing.outbox = [];
    el("turns").replaceChildren();
    el("error").hidden = true;
    const start = { type: "start", speakers: sessionSpeakers(), turns: [turn], more: true,
      format: { codec: "opus", sample_rate: 48000 } };
    begin(start);
  } else {
    sendTyped({ type: "append", turns: [turn], more: true });
  }
  typing.open = stats.typed.length;
  stats.typed.push({ turn: typing.open, speaker, text: "", spoken: null });
}

// Words go out as they are finished (up to the last space typed): a finished word can no longer
// be edited, since text sent cannot be taken back, so it moves out of the input.
function onTypingInput() {
  const input = el("typing-input");
  if (typing.open === null) {
    if (!input.value.trim()) return; // nothing to say yet
    el("typing-sent").textContent = "";
    openLine();
  }
  const cut = input.value.search(/\s\S*$/) + 1; // after the last whitespace; 0 if none
  if (cut > 0) {
    const piece = input.value.slice(0, cut);
    input.value = input.value.slice(cut);
    sendPiece(piece, false);
  }
}

function sendPiece(piece, final) {
  const line = stats.typed[typing.open];
  line.text += piece;
  if (piece || final) sendTyped({ type: "text", turn: typing.open, text: piece, final });
  el("typing-sent").textContent = final ? "" : line.text;
  if (final) typing.open = null;
  renderTyped();
}

function endLine() {
  const input = el("typing-input");
  if (typing.open === null) return;
  const rest = input.value;
  input.value = "";
  sendPiece(rest, true);
  input.focus();
}

// -- jobs: the same script, made by the server in the background (docs/jobs.md) -----------------

const following = new Map(); // job id -> its EventSource, while it is not finished
const FINISHED = ["done", "failed", "cancelled"];

function apiUrl(path) {
  const url = new URL(path, location.href);
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

function base64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function submitJob() {
  update();
  if (!script.turns.length) {
    fail("bad_field", script.errors[0]?.message || "Write at least one line like: Speaker 1: Hello.");
    return;
  }
  el("error").hidden = true;
  const speakers = script.speakers.map((number) => {
    const s = speakerSettings.get(number);
    return s.upload
      ? { name: s.name, voice_audio: base64(s.upload.bytes), voice_format: s.upload.format }
      : { name: s.name, voice: s.voice };
  });
  const turns = script.turns.map((t) => ({ speaker: t.speaker, text: t.text }));
  const r = await fetch(apiUrl("v1/jobs"), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ speakers, turns }),
  });
  const body = await r.json();
  if (!r.ok) {
    fail(body.error.code, body.error.message);
    return;
  }
  await refreshJobs();
}

function showJob(job) {
  let li = document.querySelector(`#jobs li[data-job="${job.id}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.job = job.id;
    li.innerHTML = '<span class="job-status"></span> <span class="job-progress"></span> ' +
      '<a class="job-download button" download>⤓ mp3</a>';
    el("jobs").prepend(li);
  }
  const p = job.progress;
  li.dataset.status = job.status;
  li.querySelector(".job-status").textContent = job.status + (job.position ? ` (#${job.position})` : "");
  li.querySelector(".job-progress").textContent =
    `${p.turns_done}/${p.turns_total} turns, ${p.seconds_done.toFixed(1)} s` + (p.eta_s ? `, ${Math.ceil(p.eta_s)} s left` : "");
  // While it runs the download is what is made so far: a playable prefix.
  li.querySelector(".job-download").href = apiUrl(`v1/jobs/${job.id}/audio?format=mp3`);
  if (!FINISHED.includes(job.status) && !following.has(job.id)) {
    const events = new EventSource(apiUrl(`v1/jobs/${job.id}/events`));
    events.addEventListener("status", (e) => {
      const update = JSON.parse(e.data);
      showJob(update);
      if (FINISHED.includes(update.status)) {
        events.close();
        following.delete(job.id);
      }
    });
    following.set(job.id, events);
  }
}

async function refreshJobs() {
  const r = await fetch(apiUrl("v1/jobs"));
  if (!r.ok) return; // a server without jobs, or a key that may not list them: no panel content
  const body = await r.json();
  body.jobs.slice().reverse().forEach(showJob);
}

function enableDownload() {
  const a = el("download");
  const url = new URL(`v1/sessions/${session.id}/audio.opus`, location.href);
  if (token) url.searchParams.set("token", token);
  a.href = url.toString();
  a.classList.remove("disabled");
  a.removeAttribute("aria-disabled");
}

function seconds(samples) {
  return `${(samples / 48000).toFixed(1)} s`;
}

function paint() {
  const total = Math.max(stats.session_samples || 0, stats.received_samples, 1);
  el("bar-generated").style.width = `${(100 * stats.received_samples) / total}%`;
  el("bar-played").style.width = `${(100 * stats.played_samples) / total}%`;
  el("generated-s").textContent = seconds(stats.received_samples);
  el("played-s").textContent = seconds(stats.played_samples);
  el("stat-ttfa").textContent = stats.ttfa_ms === null ? "–" : `${stats.ttfa_ms} ms`;
  el("stat-lead").textContent = stats.state === "playing" ? `${(stats.lead_ms / 1000).toFixed(1)} s` : "–";
  el("stat-underruns").textContent = String(stats.underruns);
  el("stat-rtf").textContent = stats.rtf === null || stats.rtf === undefined ? "–" : stats.rtf.toFixed(3);
}

// -- start-up ------------------------------------------------------------------------------------

async function init() {
  el("script").addEventListener("input", update);
  el("play").addEventListener("click", play);
  el("stop").addEventListener("click", stop);
  el("submit-job").addEventListener("click", submitJob);
  el("download").addEventListener("click", (e) => { if (el("download").classList.contains("disabled")) e.preventDefault(); });
  el("typing-mode").addEventListener("change", () => setTypingMode(el("typing-mode").checked));
  el("typing-input").addEventListener("input", onTypingInput);
  el("typing-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); endLine(); }
  });
  el("typing-end").addEventListener("click", endLine);
  try {
    const r = await fetch("v1/voices", token ? { headers: { Authorization: `Bearer ${token}` } } : {});
    if (!r.ok) throw new Error((await r.json()).message || r.statusText);
    const body = await r.json();
    voices = body.voices;
    el("model").textContent = body.model;
  } catch (e) {
    el("model").textContent = "server unreachable";
    fail("unreachable", `Cannot list voices: ${e.message}`);
  }
  update();
  paint();
  await refreshJobs();
  await player.prepare().catch(() => {}); // the click will report it if audio cannot start
  setState("idle", "ready");
  window.vibecast.ready = true;
}

init();
