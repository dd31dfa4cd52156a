// Opus packets in, sound out: a decoder (WebCodecs AudioDecoder, or libopus compiled to WASM
// where AudioDecoder is missing) feeding the jitter buffer in worklet.js, on a 48 kHz
// AudioContext (a 44.1 kHz one clicks at every chunk seam in Chromium).

const RATE = 48000;

function opusHead(preSkip) {
  // RFC 7845 §5.1: "OpusHead", version 1, 1 channel, pre-skip, input rate, gain 0, family 0.
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set([79, 112, 117, 115, 72, 101, 97, 100]);
  view.setUint8(8, 1);
  view.setUint8(9, 1);
  view.setUint16(10, preSkip, true);
  view.setUint32(12, RATE, true);
  return head;
}

let wasmLoading = null;

function loadWasmDecoder() {
  if (!wasmLoading) {
    wasmLoading = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = "opus-decoder.min.js";
      s.onload = () => resolve(window["opus-decoder"].OpusDecoder);
      s.onerror = () => reject(new Error("the fallback Opus decoder (opus-decoder.min.js) did not load; run scripts/setup.sh on the server"));
      document.head.appendChild(s);
    });
  }
  return wasmLoading;
}

export class Player {
  constructor(onStats, onFirstAudio, onError) {
    this.onStats = onStats;
    this.onFirstAudio = onFirstAudio;
    this.onError = onError;
    this.ctx = null;
    this.node = null;
    this.decoder = null;
    this.kind = "none";
    this.decoded = 0;
    this.sent = 0; // packets given to the decoder
    this.done = 0; // packets the decoder has decoded
    this.drainAt = null; // `drain` once this many packets are decoded
    this.early = [];
  }

  // Done once at page load: creating the context and loading the worklet takes hundreds of
  // milliseconds the first time, which should not stand between a click and the request.
  async prepare() {
    if (typeof AudioDecoder === "undefined") loadWasmDecoder().catch(() => {}); // reported on use
    if (!this.ctx) {
      this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
      this.loaded = this.ctx.audioWorklet.addModule("worklet.js");
    }
    await this.loaded;
  }

  // Must run inside the click handler: browsers start audio only on a user gesture.
  async open() {
    await this.prepare();
    await this.ctx.resume();
    if (this.node) this.node.disconnect();
    this.node = new AudioWorkletNode(this.ctx, "vibecast-player", { outputChannelCount: [1] });
    this.node.port.onmessage = (e) => this.onStats(e.data);
    this.node.connect(this.ctx.destination);
    for (const pcm of this.early) this.node.port.postMessage({ type: "audio", samples: pcm }, [pcm.buffer]);
    this.early = [];
  }

  // A new session: forget the last one's counters (called before the socket opens).
  reset() {
    if (this.node) { this.node.disconnect(); this.node = null; }
    this.close();
    this.early = [];
    this.decoded = 0;
    this.sent = 0;
    this.done = 0;
    this.drainAt = null;
  }

  async configure(preSkip) {
    this.close();
    if (typeof AudioDecoder !== "undefined") {
      this.kind = "WebCodecs";
      this.decoder = new AudioDecoder({
        output: (data) => {
          const pcm = new Float32Array(data.numberOfFrames);
          data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
          data.close();
          this.feed(pcm);
          this.decodedOne();
        },
        error: (e) => this.onError(`audio decoder: ${e.message}`),
      });
      this.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, description: opusHead(preSkip) });
    } else {
      this.kind = "WASM (libopus)";
      const OpusDecoder = await loadWasmDecoder();
      const dec = new OpusDecoder({ channels: 1, sampleRate: RATE, preSkip });
      await dec.ready;
      this.decoder = {
        decode: (packet) => {
          const { channelData, samplesDecoded } = dec.decodeFrame(packet);
          if (samplesDecoded) this.feed(channelData[0].slice(0, samplesDecoded));
          this.decodedOne();
        },
        flush: async () => {},
        close: () => dec.free(),
      };
    }
  }

  feed(pcm) {
    if (this.decoded === 0 && pcm.length) this.onFirstAudio();
    this.decoded += pcm.length;
    if (this.node) this.node.port.postMessage({ type: "audio", samples: pcm }, [pcm.buffer]);
    else this.early.push(pcm); // decoded before the audio graph was up: kept, not dropped
  }

  decode(packets) {
    for (const p of packets) {
      if (this.kind === "WebCodecs") {
        // Timestamps only order the chunks; playback time comes from the worklet.
        this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.sent * 20000, data: p }));
      } else {
        this.decoder.decode(p);
      }
      this.sent += 1;
    }
  }

  // Live input: a line ended and the next may come later. Once every packet given so far is
  // decoded (WebCodecs decodes asynchronously), tell the worklet to play out what it holds.
  drain() {
    this.drainAt = this.sent;
    this.drainIfDecoded();
  }

  decodedOne() {
    this.done += 1;
    this.drainIfDecoded();
  }

  drainIfDecoded() {
    if (this.drainAt === null || this.done < this.drainAt) return;
    this.drainAt = null;
    if (this.node) this.node.port.postMessage({ type: "drain" });
  }

  async end(totalSamples) {
    const decoder = this.decoder;
    if (decoder && decoder.flush) {
      try {
        await decoder.flush();
      } catch (e) {
        // A new take closed this decoder while it flushed: this take's end no longer matters.
        if (decoder !== this.decoder) return;
        throw e;
      }
    }
    if (this.node) this.node.port.postMessage({ type: "end", total: totalSamples });
  }

  stop() {
    if (this.node) this.node.port.postMessage({ type: "stop" });
    this.close();
  }

  close() {
    if (this.decoder) {
      try { this.decoder.close(); } catch (_) { /* already closed */ }
      this.decoder = null;
    }
  }
}
