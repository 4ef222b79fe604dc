// The midimatch page: capture audio (microphone, a file, or a rendered demo), stream it to
// /v1/stream as pcm_f32le mono, and show the rolling results. No dependencies, works offline.
//
// One run at a time: a Run is one source streamed in one session. Starting another replaces it
// (its capture is closed, its stream stopped) and nothing an older run receives is shown any
// more. What the page shows is derived from the current run alone, by render(), so the answer,
// its detail, the progress bar and the ranking never disagree.

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const tokenQuery = token ? `?token=${encodeURIComponent(token)}` : "";
// With a token, everything the page asks for carries it (the service answers 401 without it):
// its fetches and its websocket below, and the footer's links.
for (const a of document.querySelectorAll("a[data-token]")) a.href += tokenQuery;
const pieces = new Map(); // id → {title, duration_s} from /v1/pieces/{id}, or null

// Below this much audio a leading candidate is noise: the page still says "listening".
const LEAD_MIN_S = 3;
// A service without `answer` in its final result: a stream that ends with less audio than this
// and no decision was too short to judge (the page does not call it "not in the collection").
const TELL_MIN_S = 5;
// The final result carries the service's answer, {kind, text} (index/answers.py): identified,
// not_in_collection, silent or too_short, in the words `midimatch identify` and `midimatch
// stream` use. The page's state follows that kind and shows those words (sentence case) as the
// label of an ended stream: one answer everywhere.
const sentence = (t) => t.charAt(0).toUpperCase() + t.slice(1);
const NEED = "usually 5–10 s";

// The service computes its features at 22,050 Hz: capturing at that rate halves the upload and
// the audio each session keeps in Redis (bench/bus_memory.py: 1.17 MB per session at 22.05 kHz,
// 2.19 MB at 44.1/48 kHz). A browser that cannot mix rates (Firefox with a microphone) gets its
// own rate instead; the server accepts 8-96 kHz.
const CAPTURE_RATE = 22050;

let current = null; // the Run on screen
let runs = 0;

function fmtTime(s) {
  if (s == null || !isFinite(s)) return "?";
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
}

const secs = (s) => `${(s || 0).toFixed(1)} s`;
const titleOf = (x) => x.title || x.id; // whatever the index says, else the id
const pct = (c) => Math.round(100 * Math.max(0, Math.min(1, c)));

class UserError extends Error {} // a message for the listener, shown as it is

class Run {
  constructor(kind, label) {
    this.n = ++runs;
    this.kind = kind; // "mic" | "file" | "demo"
    this.label = label;
    this.demo = null; // {id, title, start_s, renderer, duration_s}: revealed once answered
    this.capture = null; // {ctx, node, source, media}
    this.stream = null;
    this.t0 = null; // performance.now() when the stream opened
    this.status = "";
    this.error = null;
    this.result = null; // the last result
    this.done = false; // the final result came
    this.decision = null; // the decision now, else null
    this.since = null; // {audio_s, wall_s}: when the current decision was made
    this.before = null; // the previous decision: {title, id, from_s, to_s, replaced}
    this.named = null; // the last piece the service named (the demo's verdict)
  }

  get live() { return this === current; }
}

// ------------------------------------------------------------------------------------ results
function onResult(r, m) {
  const d = m.decision;
  if (d) {
    if (!r.decision || r.decision.id !== d.id) {
      if (r.decision) { // the music changed without a gap: another piece, decided at once
        r.before = { id: r.decision.id, title: titleOf(r.decision), from_s: r.since.audio_s,
                     to_s: m.audio_s, replaced: true };
      }
      r.since = { audio_s: m.audio_s, wall_s: (performance.now() - r.t0) / 1000 };
    }
    r.decision = d;
    r.named = d;
  } else if (r.decision) { // the decision lapsed: lost, or the music changed
    r.before = { id: r.decision.id, title: titleOf(r.decision), from_s: r.since.audio_s,
                 to_s: m.audio_s, replaced: false };
    r.decision = null;
    r.since = null;
  }
  r.result = m;
  if (m.error) r.error = `The service gave the stream up (${m.error.code}): ${m.error.message}`;
  if (m.final) {
    r.done = true;
    if (!r.error) r.status = `${r.label}: done (${secs(m.audio_s)} of audio).`;
    closeCapture(r);
  }
  render();
}

function stateOf(r) {
  if (!r) return "idle";
  if (r.error) return "error";
  if (!r.stream) return "starting";
  if (r.decision) return "identified";
  const m = r.result;
  const kind = r.done && m && m.answer ? m.answer.kind : null;
  if (kind === "silent") return "silent";
  if (kind === "too_short") return "short";
  if (r.before) return "lost";
  if (kind === "not_in_collection") return "absent";
  if (r.done) return m && m.audio_s >= TELL_MIN_S ? "absent" : "short";
  if (m && m.matches.length && m.audio_s >= LEAD_MIN_S) return "leading";
  return "listening";
}

const LABELS = {
  idle: "Waiting",
  starting: "Starting",
  listening: "Listening",
  leading: "Leading candidate — not sure yet",
  identified: "Identified",
  lost: "Lost — the music changed, or the service is no longer sure",
  absent: "Not in the collection", // a service without `answer`; else its words
  silent: "Silent",
  short: "Too short to tell",
  error: "Error",
};

function render() {
  const r = current;
  const st = stateOf(r);
  const m = r ? r.result : null;
  const audio = m ? m.audio_s : 0;
  const top = m && m.matches.length ? m.matches[0] : null;
  let head = "";
  let detail = "";
  let since = "";
  let progress = null;
  if (st === "idle") {
    head = "nothing yet";
    detail = "Choose a source above.";
  } else if (st === "starting") {
    head = { mic: "Waiting for the microphone…", file: "Decoding the file…",
             demo: r.demo ? "Decoding the demo excerpt…" : "Rendering a demo excerpt…" }[r.kind];
  } else if (st === "listening") {
    head = m ? `Listening… ${secs(audio)} of audio so far` : "Listening…";
    detail = `The service needs a few seconds of music to name a piece (${NEED}).`;
  } else if (st === "leading") {
    head = `Maybe “${titleOf(top)}”`;
    detail = `Leading with ${pct(top.confidence)} % after ${secs(audio)} of audio, not sure ` +
      `yet: the service names a piece once it is (${NEED}).`;
  } else if (st === "identified") {
    const d = r.decision;
    const info = pieceInfoNow(d.id);
    const total = info ? info.duration_s : null;
    head = titleOf(d);
    detail = `confidence ${pct(d.confidence)} % · position ${fmtTime(d.position_s)}` +
      (total ? ` of ${fmtTime(total)}` : "");
    if (total) progress = Math.min(100, (100 * d.position_s) / total);
    since = `Identified after ${secs(r.since.audio_s)} of audio ` +
      `(${r.since.wall_s.toFixed(1)} s since the start)`;
    if (r.before) {
      since += r.before.replaced
        ? `; the music changed: it was “${r.before.title}” before`
        : `; before that, “${r.before.title}” was lost at ${secs(r.before.to_s)}`;
    }
    since += r.done ? `. Final answer after ${secs(audio)} of audio.` : ".";
  } else if (st === "lost") {
    const b = r.before;
    head = r.done ? "Not sure any more at the end" : "Not sure any more";
    if (r.done && b.to_s >= audio) {
      detail = `“${b.title}” was identified from ${secs(b.from_s)} of audio until the end ` +
        `(${secs(audio)}), where the service was no longer sure.`;
    } else {
      detail = `“${b.title}” was identified from ${secs(b.from_s)} to ${secs(b.to_s)} of ` +
        `audio; then the service stopped being sure.`;
      if (r.done) detail += ` The stream ended at ${secs(audio)}.`;
      else if (top) detail += ` Leading now: “${titleOf(top)}” (${pct(top.confidence)} %).`;
    }
  } else if (st === "absent") {
    head = top ? `Best guess “${titleOf(top)}” (${pct(top.confidence)} %): not confident`
      : "No piece of the collection came close";
    detail = `No piece of the collection matched confidently in ${secs(audio)} of audio.`;
  } else if (st === "silent") {
    head = "Too quiet to search";
    detail = `After ${secs(audio)} of audio: the part searched (the last 20 s) is under ` +
      `−60 dBFS, so there is no music to identify.`;
  } else if (st === "short") {
    head = "Too short to tell";
    detail = `Only ${secs(audio)} of audio: the service needs a few seconds of music to ` +
      `name a piece (${NEED}).`;
  } else if (st === "error") { // the error itself is on the status line, in red
    if (r.stream) {
      head = "No answer";
      detail = "The stream ended with the error above; start again to retry.";
    } else if (r.kind === "file") {
      head = "This file cannot be streamed";
      detail = "Choose an audio file this browser can play (WAV, MP3, Ogg, FLAC…).";
    } else {
      head = "Nothing was streamed";
      detail = "The error above says why.";
    }
  }
  const answer = r && r.done && !r.error && m ? m.answer : null;
  $("answer").dataset.state = st;
  // an ended stream is labelled with the service's answer
  $("state-label").textContent = answer && answer.text ? sentence(answer.text) : LABELS[st];
  $("decision-title").textContent = head;
  $("decision-detail").textContent = detail;
  $("decided-after").textContent = since;
  $("progress").hidden = progress == null;
  if (progress != null) $("progress-line").style.width = `${progress}%`;

  $("status").textContent = r ? (r.error || r.status) : "Idle.";
  $("status").classList.toggle("error", Boolean(r && r.error));
  $("stop").disabled = !(r && r.capture);
  renderDemo(r);
  renderRanking(m, r && r.decision ? r.decision.id : null);
}

function renderRanking(m, decidedId) {
  $("ranking-box").hidden = !(m && m.matches.length);
  if (!m) {
    $("ranking").replaceChildren();
    return;
  }
  $("audio-s").textContent = `after ${secs(m.audio_s)} of audio`;
  const items = m.matches.map((x) => {
    const li = document.createElement("li");
    li.dataset.id = x.id;
    if (x.id === decidedId) li.className = "decided";
    const p = pct(x.confidence);
    li.innerHTML = `<span class="title"></span><span class="bar"><div style="width:${p}%"></div></span><span class="conf">${p} %</span>`;
    li.querySelector(".title").textContent = titleOf(x);
    li.title = `score ${x.score.toFixed(2)}, at ${fmtTime(x.position_s)}`;
    return li;
  });
  $("ranking").replaceChildren(...items);
}

// The demo's answer stays hidden until the service has named a piece (or the run ended).
function renderDemo(r) {
  const el = $("demo-info");
  el.className = "";
  if (!r || !r.demo) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  const d = r.demo;
  el.hidden = false;
  const what = `“${d.title}” from ${fmtTime(d.start_s)} (rendered with ${d.renderer})`;
  if (!r.named && !r.done && !r.error) {
    el.textContent = `Demo: ${d.duration_s ? `a ${secs(d.duration_s)}` : "an"} excerpt of a ` +
      `random piece of the collection. Can the service tell which? The answer shows here once ` +
      `it has decided.`;
  } else if (r.named && r.named.id === d.id) {
    el.className = "right";
    el.textContent = `✓ Right: the demo is ${what}.`;
  } else if (r.named) {
    el.className = "wrong";
    el.textContent = `✗ Wrong: the demo is ${what}; the service named “${titleOf(r.named)}”.`;
  } else {
    el.textContent = `The demo is ${what}; the service named no piece.`;
  }
}

function pieceInfoNow(id) {
  if (!pieces.has(id)) {
    pieces.set(id, null);
    fetch(`/v1/pieces/${encodeURIComponent(id)}${tokenQuery}`)
      .then((r) => (r.ok ? r.json() : null))
      .then((info) => { if (info) { pieces.set(id, info); render(); } })
      .catch(() => { /* no catalogue on this gateway: position without a total */ });
  }
  return pieces.get(id);
}

// ------------------------------------------------------------------------------------ streams
// One audio stream: a websocket session that survives a dropped connection by resuming.
class Stream {
  constructor(run, sampleRate) {
    this.run = run;
    this.sampleRate = sampleRate;
    this.session = null;
    this.after = null; // id of the last result received, for resuming
    this.pending = []; // audio captured while (re)connecting
    this.ready = false;
    this.stopped = false;
    this.finished = false;
    this.failed = false;
    this.retries = 0;
    this.connect();
  }

  connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/v1/stream${tokenQuery}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.ready = false;
    ws.onopen = () => {
      const start = { type: "start", v: 1, sample_rate: this.sampleRate, channels: 1,
                      encoding: "pcm_f32le" };
      if (this.session) Object.assign(start, { session: this.session, after: this.after });
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (ev) => this.onMessage(JSON.parse(ev.data));
    ws.onclose = (ev) => this.onClose(ev);
  }

  onMessage(m) {
    const r = this.run;
    if (m.type === "ready") {
      this.session = m.session;
      this.ready = true;
      this.retries = 0;
      for (const buf of this.pending) this.ws.send(buf);
      this.pending = [];
      if (this.stopped) this.ws.send(JSON.stringify({ type: "stop", v: 1 }));
      if (r.live && !r.done) {
        r.status = `${r.label}: streaming at ${this.sampleRate} Hz` +
          `${m.resumed ? " (resumed)" : ""}…`;
        render();
      }
    } else if (m.type === "result") {
      this.after = m.result_id;
      if (m.final) this.finished = true;
      if (r.live) onResult(r, m);
    } else if (m.type === "error") {
      this.failed = true;
      if (r.live) {
        r.error = `Error (${m.code}): ${m.message}`;
        closeCapture(r);
        render();
      }
    }
  }

  onClose(ev) {
    const r = this.run;
    if (!r.live) return; // replaced by another run: nothing of this one is shown any more
    if (this.finished || this.failed || ev.code !== 1006 || this.retries >= 5) {
      if (!this.finished && !this.failed) {
        r.error = `The connection closed (code ${ev.code}) before the final answer.`;
      }
      closeCapture(r);
      render();
      return;
    }
    this.retries += 1; // dropped: resume the same session, the missed results come back
    r.status = `Connection lost; resuming (try ${this.retries})…`;
    render();
    setTimeout(() => { if (r.live) this.connect(); }, 300 * this.retries);
  }

  send(samples) {
    if (this.stopped) return;
    const buf = samples.buffer;
    if (this.ready && this.ws.readyState === WebSocket.OPEN) this.ws.send(buf);
    else this.pending.push(buf);
  }

  stop() {
    if (this.stopped) return;
    this.stopped = true;
    if (this.ready && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "stop", v: 1 }));
    }
  }
}

// ------------------------------------------------------------------------------------ capture
// Close a run's audio (source, microphone, context) and stop its stream: the service then sends
// the final result. Safe to call twice.
function closeCapture(r) {
  if (r.stream && !r.stream.finished) r.stream.stop();
  const c = r.capture;
  if (!c) return;
  r.capture = null;
  if (c.source && c.source.stop) { try { c.source.stop(); } catch (e) { /* ended */ } }
  if (c.media) c.media.getTracks().forEach((t) => t.stop());
  if (c.node) c.node.port.onmessage = null;
  if (c.ctx) c.ctx.close().catch(() => {});
}

// Start a run: replace the current one, get its input (a file's bytes, the demo, the
// microphone), decode it, and only then open the stream: a file that cannot be decoded opens
// no session, and its error stays on screen until the next run.
async function startRun(kind, label, getInput) {
  const old = current;
  const r = new Run(kind, label);
  current = r;
  if (old) closeCapture(old);
  r.status = `${label}: starting…`;
  render();
  let input = null;
  try {
    input = await getInput(r);
    if (r.live) await openAudio(r, input, CAPTURE_RATE);
  } catch (e) {
    if (r.live) {
      r.error = e instanceof UserError ? e.message : `${label}: ${e.name || "Error"}: ${e.message}`;
      closeCapture(r);
      render();
    }
  }
  if (!r.live && input && input.media && !r.capture) input.media.getTracks().forEach((t) => t.stop());
}

async function openAudio(r, input, rate) {
  let ctx;
  try { ctx = new AudioContext(rate ? { sampleRate: rate } : {}); } catch (e) { ctx = new AudioContext(); }
  r.capture = { ctx, media: input.media };
  await ctx.audioWorklet.addModule("/static/worklet.js");
  if (!r.live) return;
  let audio = null;
  if (input.bytes) {
    if (!input.bytes.byteLength) {
      throw new UserError(`${input.name} is empty (0 bytes). Nothing was streamed.`);
    }
    try {
      audio = await ctx.decodeAudioData(input.bytes.slice(0));
    } catch (e) {
      throw new UserError(`Cannot decode ${input.name}: it is not audio this browser can play ` +
                          `(${e.message || e.name}). Nothing was streamed.`);
    }
    if (!audio.length || audio.duration < 0.05) {
      throw new UserError(`${input.name} holds no audio. Nothing was streamed.`);
    }
    if (r.demo) r.demo.duration_s = audio.duration;
  }
  if (!r.live) return;
  const node = new AudioWorkletNode(ctx, "pcm-tap", { numberOfInputs: 1, numberOfOutputs: 1 });
  const mute = ctx.createGain(); // keeps the worklet pulled without playing the microphone
  mute.gain.value = 0;
  node.connect(mute).connect(ctx.destination);
  r.capture.node = node;
  let source;
  if (input.media) {
    try {
      source = ctx.createMediaStreamSource(input.media);
    } catch (e) {
      if (e && e.name === "NotSupportedError" && rate) { // cannot mix rates: take the device's
        r.capture.media = null; // keep the microphone open for the second try
        closeCapture(r);
        return openAudio(r, input, null);
      }
      throw e;
    }
  } else {
    source = ctx.createBufferSource();
    source.buffer = audio;
    source.connect(ctx.destination); // the listener hears what is being identified
    source.onended = () => {
      if (r.live && r.capture && !r.done) {
        r.status = `${r.label}: all ${secs(audio.duration)} sent; waiting for the final answer…`;
        closeCapture(r);
        render();
      }
    };
  }
  r.capture.source = source;
  r.stream = new Stream(r, ctx.sampleRate);
  r.t0 = performance.now();
  node.port.onmessage = (ev) => r.stream.send(ev.data);
  source.connect(node);
  if (source.start) source.start();
  if (ctx.state === "suspended") await ctx.resume();
  render();
}

// ------------------------------------------------------------------------------------ sources
$("mic").onclick = () => startRun("mic", "Microphone", async () => {
  try {
    return {
      media: await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      }),
    };
  } catch (e) {
    throw new UserError(`Microphone unavailable: ${e.message || e.name}`);
  }
});

$("file").onchange = (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  ev.target.value = ""; // choosing the same file again starts another run
  startRun("file", `File ${f.name}`, async () => ({ name: f.name, bytes: await f.arrayBuffer() }));
};

$("demo").onclick = () => startRun("demo", "Demo", async (r) => {
  r.status = "Rendering a demo excerpt…";
  render();
  const resp = await fetch(`/v1/demo${tokenQuery}`);
  if (!resp.ok) {
    let why = resp.statusText;
    try { why = (await resp.json()).error || why; } catch (e) { /* not JSON */ }
    throw new UserError(`No demo: ${why}`);
  }
  const bytes = await resp.arrayBuffer();
  r.demo = {
    id: resp.headers.get("X-Demo-Id"),
    title: decodeURIComponent(resp.headers.get("X-Demo-Title") || ""),
    start_s: Number(resp.headers.get("X-Demo-Start-S") || 0),
    renderer: resp.headers.get("X-Demo-Renderer") || "?",
    duration_s: null, // once decoded
  };
  return { name: "the demo", bytes };
});

$("stop").onclick = () => {
  const r = current;
  if (!r || !r.capture) return;
  r.status = `${r.label}: stopped; waiting for the final answer…`;
  closeCapture(r);
  render();
};

render();
