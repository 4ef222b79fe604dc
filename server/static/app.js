// The midimatch page: capture audio (microphone, a file, or a rendered demo), stream it to
// /v1/stream as pcm_f32le mono, and show the rolling results. No dependencies, works offline.

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const tokenQuery = token ? `?token=${encodeURIComponent(token)}` : "";
const pieces = new Map(); // id → {title, duration_s} from /v1/pieces/{id}

let stream = null; // the current Stream, or null

function fmtTime(s) {
  if (s == null || !isFinite(s)) return "?";
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function pieceInfo(id) {
  if (!pieces.has(id)) {
    pieces.set(id, null);
    try {
      const r = await fetch(`/v1/pieces/${encodeURIComponent(id)}${tokenQuery}`);
      if (r.ok) pieces.set(id, await r.json());
    } catch (e) { /* no catalogue on this gateway: position without a total */ }
  }
  return pieces.get(id);
}

// One audio stream: a websocket session that survives a dropped connection by resuming.
class Stream {
  constructor(ctx, label) {
    this.ctx = ctx;
    this.label = label;
    this.session = null;
    this.after = null; // id of the last result shown, for resuming
    this.pending = []; // audio captured while (re)connecting
    this.ready = false;
    this.stopped = false;
    this.finished = false;
    this.retries = 0;
    this.t0 = performance.now();
    this.decided = false;
    this.connect();
  }

  connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/v1/stream${tokenQuery}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.ready = false;
    ws.onopen = () => {
      const start = { type: "start", v: 1, sample_rate: this.ctx.sampleRate, channels: 1,
                      encoding: "pcm_f32le" };
      if (this.session) Object.assign(start, { session: this.session, after: this.after });
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (ev) => this.onMessage(JSON.parse(ev.data));
    ws.onclose = (ev) => this.onClose(ev);
  }

  onMessage(m) {
    if (m.type === "ready") {
      this.session = m.session;
      this.ready = true;
      this.retries = 0;
      setStatus(`${this.label}: streaming at ${this.ctx.sampleRate} Hz${m.resumed ? " (resumed)" : ""}…`);
      for (const buf of this.pending) this.ws.send(buf);
      this.pending = [];
      if (this.stopped) this.ws.send(JSON.stringify({ type: "stop", v: 1 }));
    } else if (m.type === "result") {
      this.after = m.result_id;
      showResult(m, this);
      if (m.final) this.finished = true;
    } else if (m.type === "error") {
      this.failed = true;
      setStatus(`Error (${m.code}): ${m.message}`, true);
    }
  }

  onClose(ev) {
    if (this.finished || this.failed || ev.code !== 1006 || this.retries >= 5) {
      if (!this.failed) setStatus(this.finished ? `${this.label}: done.` : `Connection closed (${ev.code}).`);
      endCapture(this);
      return;
    }
    this.retries += 1; // dropped: resume the same session, the missed results come back
    setStatus(`Connection lost; resuming (try ${this.retries})…`);
    setTimeout(() => this.connect(), 300 * this.retries);
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

let capture = null; // {ctx, node, source, media, stream}

// The service computes its features at 22,050 Hz: capturing at that rate halves the upload and
// the audio each session keeps in Redis (bench/bus_memory.py: 1.17 MB per session at 22.05 kHz,
// 2.19 MB at 44.1/48 kHz). A browser that cannot mix rates (Firefox with a microphone) gets its
// own rate instead; the server accepts 8-96 kHz.
const CAPTURE_RATE = 22050;

async function startCapture(label, connectSource, rate = CAPTURE_RATE) {
  if (capture) await stopCapture();
  let ctx;
  try { ctx = new AudioContext(rate ? { sampleRate: rate } : {}); } catch (e) { ctx = new AudioContext(); }
  await ctx.audioWorklet.addModule("/static/worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm-tap", { numberOfInputs: 1, numberOfOutputs: 1 });
  const mute = ctx.createGain(); // keeps the worklet pulled without playing the microphone
  mute.gain.value = 0;
  node.connect(mute).connect(ctx.destination);
  stream = new Stream(ctx, label);
  const s = stream;
  node.port.onmessage = (ev) => s.send(ev.data);
  capture = { ctx, node, stream: s };
  clearResults();
  $("stop").disabled = false;
  try {
    await connectSource(ctx, node, capture);
  } catch (e) {
    if (e && e.name === "NotSupportedError" && rate) {
      await stopCapture();
      return startCapture(label, connectSource, null);
    }
    throw e;
  }
  if (ctx.state === "suspended") await ctx.resume();
}

async function stopCapture() {
  if (!capture) return;
  const c = capture;
  capture = null;
  c.stream.stop();
  if (c.source && c.source.stop) { try { c.source.stop(); } catch (e) { /* already ended */ } }
  if (c.media) c.media.getTracks().forEach((t) => t.stop());
  c.node.port.onmessage = null;
  await c.ctx.close();
  $("stop").disabled = true;
}

function endCapture(s) {
  if (capture && capture.stream === s) stopCapture();
}

async function playBuffer(label, arrayBuffer) {
  await startCapture(label, async (ctx, node, c) => {
    const audio = await ctx.decodeAudioData(arrayBuffer);
    const src = ctx.createBufferSource();
    src.buffer = audio;
    src.connect(node);
    src.connect(ctx.destination); // the listener hears what is being identified
    src.onended = () => { if (capture === c) c.stream.stop(); };
    c.source = src;
    src.start();
  });
}

function clearResults() {
  $("ranking").replaceChildren();
  $("decision-title").textContent = "listening…";
  $("decision-title").className = "none";
  $("decision-detail").textContent = "";
  $("decided-after").textContent = "";
  $("progress").hidden = true;
  $("audio-s").textContent = "";
}

async function showResult(m, s) {
  $("audio-s").textContent = `after ${m.audio_s.toFixed(1)} s of audio`;
  const decidedId = m.decision ? m.decision.id : null;
  const items = m.matches.map((x) => {
    const li = document.createElement("li");
    li.dataset.id = x.id;
    if (x.id === decidedId) li.className = "decided";
    const pct = Math.round(100 * Math.max(0, Math.min(1, x.confidence)));
    li.innerHTML = `<span class="title"></span><span class="bar"><div style="width:${pct}%"></div></span><span class="conf">${pct}%</span>`;
    li.querySelector(".title").textContent = x.title;
    li.title = `score ${x.score.toFixed(2)}, at ${fmtTime(x.position_s)}`;
    return li;
  });
  $("ranking").replaceChildren(...items);
  if (!m.decision) {
    if (m.final) $("decision-title").textContent = "not in the collection (no confident match)";
    return;
  }
  const d = m.decision;
  $("decision-title").textContent = d.title;
  $("decision-title").className = "";
  if (!s.decided) {
    s.decided = true;
    const wall = (performance.now() - s.t0) / 1000;
    $("decided-after").textContent =
      `Decided after ${m.audio_s.toFixed(1)} s of audio (${wall.toFixed(1)} s since the start).`;
  }
  const info = await pieceInfo(d.id);
  const total = info ? info.duration_s : null;
  $("decision-detail").textContent =
    `confidence ${Math.round(100 * d.confidence)}% · position ${fmtTime(d.position_s)}` +
    (total ? ` of ${fmtTime(total)}` : "");
  if (total) {
    $("progress").hidden = false;
    $("progress-line").style.width = `${Math.min(100, (100 * d.position_s) / total)}%`;
  }
}

$("mic").onclick = async () => {
  try {
    await startCapture("Microphone", async (ctx, node, c) => {
      c.media = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
      ctx.createMediaStreamSource(c.media).connect(node);
    });
  } catch (e) {
    setStatus(`Microphone unavailable: ${e.message}`, true);
    await stopCapture();
  }
};

$("file").onchange = async (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  try {
    await playBuffer(`File ${f.name}`, await f.arrayBuffer());
  } catch (e) {
    setStatus(`Cannot play ${f.name}: ${e.message}`, true);
    await stopCapture();
  }
};

$("demo").onclick = async () => {
  $("demo").disabled = true;
  setStatus("Rendering a demo excerpt…");
  try {
    const r = await fetch(`/v1/demo${tokenQuery}`);
    if (!r.ok) throw new Error((await r.json()).error || r.statusText);
    const title = decodeURIComponent(r.headers.get("X-Demo-Title") || "");
    const start = Number(r.headers.get("X-Demo-Start-S") || 0);
    $("demo-info").hidden = false;
    $("demo-info").textContent = `Demo: “${title}” from ${fmtTime(start)} ` +
      `(rendered with ${r.headers.get("X-Demo-Renderer")}). Can the service tell?`;
    await playBuffer("Demo", await r.arrayBuffer());
  } catch (e) {
    setStatus(`No demo: ${e.message}`, true);
  } finally {
    $("demo").disabled = false;
  }
};

$("stop").onclick = () => stopCapture();
