// The jitter buffer, on the audio thread: decoded 48 kHz samples in, one render quantum out.
//
// - It waits for `prebuffer` samples before it starts (and again after an underrun, with a
//   larger prebuffer), so network jitter does not reach the speaker.
// - An underrun fades out over FADE samples instead of cutting, and playback fades back in.
// - `end` gives the session's exact length: playback stops after exactly that many samples.
// - `stop` fades out at once and drops everything queued; it reports when it is silent.
// - `drain` (live input: a line typed while it speaks has ended, and the next may be a while):
//   play what is queued even if it is less than the prebuffer; running out after it is a pause
//   until the next line's audio, not an underrun.
// It posts {played, buffered, underruns, state} about 40 times a second.

const FADE = 240; // 5 ms at 48 kHz
// 250 ms before the first sound: the server's first chunk is short (it is made fast), and
// waiting for the second one too keeps a slow start from running dry.
const PREBUFFER = 12000;

class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0; // read position in queue[0]
    this.buffered = 0;
    this.played = 0;
    this.total = -1; // known once the server sent `done`
    this.prebuffer = PREBUFFER;
    this.waiting = true;
    this.draining = false;
    this.underruns = 0;
    this.gain = 0; // fades between 0 and 1
    this.stopping = false;
    this.finished = false;
    this.quanta = 0;
    this.port.onmessage = (e) => this.command(e.data);
  }

  command(m) {
    if (m.type === "audio") {
      if (this.stopping) return;
      this.queue.push(m.samples);
      this.buffered += m.samples.length;
    } else if (m.type === "end") {
      this.total = m.total;
    } else if (m.type === "stop") {
      this.stopping = true;
    } else if (m.type === "drain") {
      this.draining = true;
    }
  }

  take(out, start, n) {
    let i = start;
    while (i < start + n && this.queue.length) {
      const head = this.queue[0];
      const k = Math.min(head.length - this.offset, start + n - i);
      out.set(head.subarray(this.offset, this.offset + k), i);
      this.offset += k;
      i += k;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    const got = i - start;
    this.buffered -= got;
    return got;
  }

  report(state) {
    this.port.postMessage({ played: this.played, buffered: this.buffered, underruns: this.underruns, state });
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    out.fill(0);
    if (this.stopping) {
      // One quantum (2.7 ms) of fade from whatever is queued, then silence for good.
      if (!this.finished) {
        const got = this.take(out, 0, n);
        for (let i = 0; i < got; i++) out[i] *= this.gain * (1 - i / n);
        this.queue = [];
        this.buffered = 0;
        this.finished = true;
        this.report("stopped");
      }
      return true;
    }
    if (this.finished) return true;
    const remaining = this.total >= 0 ? this.total - this.played : Infinity;
    const ending = (this.total >= 0 && this.buffered >= remaining) || this.draining;
    if (this.waiting) {
      const enough = this.draining
        ? this.buffered > 0
        : this.buffered >= Math.min(this.prebuffer, remaining) && (this.buffered > 0 || ending);
      if (enough) {
        this.waiting = false;
      } else {
        if (++this.quanta % 10 === 0) this.report(this.played ? "buffering" : "waiting");
        return true;
      }
    }
    const want = Math.min(n, remaining);
    const got = this.take(out, 0, want);
    for (let i = 0; i < got; i++) {
      // Fade in after a start or an underrun; fade out when the buffer is about to run dry.
      const left = this.buffered + got - i;
      const target = !ending && left <= FADE ? left / FADE : 1;
      this.gain = Math.min(target, this.gain + 1 / FADE);
      out[i] *= this.gain;
    }
    this.played += got;
    if (this.total >= 0 && this.played >= this.total) {
      this.finished = true;
      this.report("finished");
      return true;
    }
    if (got < want && this.draining) {
      // The line's audio is out (it ends in its silence padding): wait for the next line's
      // with the first prebuffer again; nothing was missing, so no underrun.
      this.draining = false;
      this.waiting = true;
      this.gain = 0;
      this.prebuffer = PREBUFFER;
      this.report("paused");
      return true;
    }
    if (got < want || (!ending && this.buffered < FADE)) {
      // Ran dry (or about to): count it, wait for a bigger cushion, fade back in later.
      this.underruns += 1;
      this.waiting = true;
      this.gain = 0;
      this.prebuffer = Math.min(48000, Math.round(this.prebuffer * 1.5));
      this.report("underrun");
      return true;
    }
    if (++this.quanta % 10 === 0) this.report("playing");
    return true;
  }
}

registerProcessor("vibecast-player", Player);
