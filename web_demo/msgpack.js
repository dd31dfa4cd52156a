// MessagePack for the vibecast.v1 wire format: the subset a browser needs, written in-house.
// encode: null, booleans, numbers (ints as int/uint, others as float64), strings, Uint8Array /
// ArrayBuffer (bin), arrays and plain objects. decode: every type the spec defines; ext values
// come back as {ext: type, data}.

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

export function encode(value) {
  const out = new Writer();
  write(out, value);
  return out.bytes();
}

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }
  room(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf);
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(x) { this.room(1); this.buf[this.pos++] = x; }
  u16(x) { this.room(2); this.view.setUint16(this.pos, x); this.pos += 2; }
  u32(x) { this.room(4); this.view.setUint32(this.pos, x); this.pos += 4; }
  f64(x) { this.room(8); this.view.setFloat64(this.pos, x); this.pos += 8; }
  raw(bytes) { this.room(bytes.length); this.buf.set(bytes, this.pos); this.pos += bytes.length; }
  bytes() { return this.buf.slice(0, this.pos); }
}

function writeInt(out, x) {
  if (x >= 0) {
    if (x < 0x80) out.u8(x);
    else if (x < 0x100) { out.u8(0xcc); out.u8(x); }
    else if (x < 0x10000) { out.u8(0xcd); out.u16(x); }
    else if (x < 0x100000000) { out.u8(0xce); out.u32(x); }
    else { out.u8(0xcf); out.u32(Math.floor(x / 0x100000000)); out.u32(x >>> 0); }
  } else if (x >= -32) out.u8(0xe0 | (x + 32));
  else if (x >= -128) { out.u8(0xd0); out.u8(x & 0xff); }
  else if (x >= -32768) { out.u8(0xd1); out.u16(x & 0xffff); }
  else if (x >= -2147483648) { out.u8(0xd2); out.u32(x >>> 0); }
  else { out.u8(0xd3); out.u32(Math.floor(x / 0x100000000) >>> 0); out.u32(x >>> 0); }
}

function writeLength(out, n, fix, fixMax, c8, c16, c32) {
  if (n <= fixMax && fix !== null) out.u8(fix | n);
  else if (n < 0x100 && c8 !== null) { out.u8(c8); out.u8(n); }
  else if (n < 0x10000) { out.u8(c16); out.u16(n); }
  else { out.u8(c32); out.u32(n); }
}

function write(out, v) {
  if (v === null || v === undefined) out.u8(0xc0);
  else if (v === false) out.u8(0xc2);
  else if (v === true) out.u8(0xc3);
  else if (typeof v === "number") {
    if (Number.isSafeInteger(v)) writeInt(out, v);
    else { out.u8(0xcb); out.f64(v); }
  } else if (typeof v === "string") {
    const b = utf8.encode(v);
    writeLength(out, b.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    out.raw(b);
  } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
    const b = v instanceof ArrayBuffer ? new Uint8Array(v) : v;
    writeLength(out, b.length, null, -1, 0xc4, 0xc5, 0xc6);
    out.raw(b);
  } else if (Array.isArray(v)) {
    writeLength(out, v.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of v) write(out, item);
  } else if (typeof v === "object") {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    writeLength(out, keys.length, 0x80, 15, null, 0xde, 0xdf);
    for (const k of keys) { write(out, k); write(out, v[k]); }
  } else {
    throw new TypeError(`msgpack: cannot encode ${typeof v}`);
  }
}

export function decode(input) {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  const r = { bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), pos: 0 };
  const value = read(r);
  if (r.pos !== bytes.length) throw new Error("msgpack: extra bytes after the value");
  return value;
}

function need(r, n) {
  if (r.pos + n > r.bytes.length) throw new Error("msgpack: truncated");
}

function take(r, n) {
  need(r, n);
  const out = r.bytes.subarray(r.pos, r.pos + n);
  r.pos += n;
  return out;
}

function num(r, kind, n) {
  need(r, n);
  const v = r.view[kind](r.pos);
  r.pos += n;
  return v;
}

function array(r, n) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = read(r);
  return out;
}

function map(r, n) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const k = read(r);
    out[String(k)] = read(r);
  }
  return out;
}

function read(r) {
  const t = num(r, "getUint8", 1);
  if (t < 0x80) return t;
  if (t < 0x90) return map(r, t & 0x0f);
  if (t < 0xa0) return array(r, t & 0x0f);
  if (t < 0xc0) return utf8d.decode(take(r, t & 0x1f));
  if (t >= 0xe0) return t - 0x100;
  switch (t) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return take(r, num(r, "getUint8", 1)).slice();
    case 0xc5: return take(r, num(r, "getUint16", 2)).slice();
    case 0xc6: return take(r, num(r, "getUint32", 4)).slice();
    case 0xc7: { const n = num(r, "getUint8", 1); const e = num(r, "getInt8", 1); return { ext: e, data: take(r, n).slice() }; }
    case 0xc8: { const n = num(r, "getUint16", 2); const e = num(r, "getInt8", 1); return { ext: e, data: take(r, n).slice() }; }
    case 0xc9: { const n = num(r, "getUint32", 4); const e = num(r, "getInt8", 1); return { ext: e, data: take(r, n).slice() }; }
    case 0xca: return num(r, "getFloat32", 4);
    case 0xcb: return num(r, "getFloat64", 8);
    case 0xcc: return num(r, "getUint8", 1);
    case 0xcd: return num(r, "getUint16", 2);
    case 0xce: return num(r, "getUint32", 4);
    case 0xcf: { const hi = num(r, "getUint32", 4); const lo = num(r, "getUint32", 4); return hi * 0x100000000 + lo; }
    case 0xd0: return num(r, "getInt8", 1);
    case 0xd1: return num(r, "getInt16", 2);
    case 0xd2: return num(r, "getInt32", 4);
    case 0xd3: { const hi = num(r, "getInt32", 4); const lo = num(r, "getUint32", 4); return hi * 0x100000000 + lo; }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: {
      const e = num(r, "getInt8", 1);
      return { ext: e, data: take(r, 1 << (t - 0xd4)).slice() };
    }
    case 0xd9: return utf8d.decode(take(r, num(r, "getUint8", 1)));
    case 0xda: return utf8d.decode(take(r, num(r, "getUint16", 2)));
    case 0xdb: return utf8d.decode(take(r, num(r, "getUint32", 4)));
    case 0xdc: return array(r, num(r, "getUint16", 2));
    case 0xdd: return array(r, num(r, "getUint32", 4));
    case 0xde: return map(r, num(r, "getUint16", 2));
    case 0xdf: return map(r, num(r, "getUint32", 4));
    default: throw new Error(`msgpack: unknown type byte 0x${t.toString(16)}`);
  }
}
