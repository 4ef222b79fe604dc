// AudioWorklet: mixes its input to mono and posts Float32 blocks of BLOCK frames to the page.
// Posting every 128-frame render quantum would mean ~375 messages/s; BLOCK frames at 48 kHz is
// one message every ~85 ms, well inside the protocol's 1 s result cadence.
const BLOCK = 4096;

class PcmTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buf = new Float32Array(BLOCK);
    this.n = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const frames = input[0].length;
    for (let i = 0; i < frames; i++) {
      let s = 0;
      for (let c = 0; c < input.length; c++) s += input[c][i];
      this.buf[this.n++] = s / input.length;
      if (this.n === BLOCK) {
        this.port.postMessage(this.buf, [this.buf.buffer]);
        this.buf = new Float32Array(BLOCK);
        this.n = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-tap", PcmTap);
