/**
 * Fossil delta decoding (PROTOCOL.md 1.2 delta messages): the format of
 * https://fossil-scm.org/home/doc/tip/www/delta_format.wiki. A delta is the
 * target's size as a base-64 integer and `\n`, then commands `N@O,` (copy N
 * bytes of the source from offset O) and `N:` + N literal bytes, and last `C;`
 * where C is the target's checksum. Every bound is checked as Fossil's
 * delta_apply() does, and the checksum always: a corrupted delta or a wrong
 * base throws instead of returning wrong bytes. Written here rather than
 * bundling npm's fossil-delta (about 1.3 KB min+gzip with its encoder's
 * helpers) to keep the core bundle in its budget; the tests check it against
 * that package's encoder and against the node's deltas.
 */

const DIGITS = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~';

/** Fossil's checksum: the bytes as big-endian 32-bit words (the last one padded with zeros), summed mod 2^32. */
export function checksum(b: Uint8Array): number {
  let s = 0;
  let i = 0;
  for (const n = b.length - 3; i < n; i += 4) s = (s + ((b[i]! << 24) | (b[i + 1]! << 16) | (b[i + 2]! << 8) | b[i + 3]!)) | 0;
  for (; i < b.length; i++) s = (s + (b[i]! << (24 - 8 * (i & 3)))) | 0;
  return s >>> 0;
}

/** The target that `delta` makes of `source`; throws when it does not apply (malformed, out of bounds, bad checksum). */
export function applyDelta(source: Uint8Array, delta: Uint8Array): Uint8Array {
  let p = 0;
  let n = 0;
  const int = (): number => {
    // As Fossil's deltaGetInt(): digits up to the first non-digit (none: 0). Past the end,
    // delta[p] is undefined, which fromCharCode makes "\0": not a digit.
    let v = 0;
    for (let d; (d = DIGITS.indexOf(String.fromCharCode(delta[p]!))) >= 0; p++) v = v * 64 + d;
    return v;
  };
  const limit = int();
  // Each command takes 4 bytes or more and copies at most the whole source: a larger size is corrupt.
  const out = delta[p++] === 10 && limit <= delta.length * (source.length + 1) ? new Uint8Array(limit) : null;
  while (out && p < delta.length) {
    const cnt = int();
    const op = delta[p++];
    if (op === 59) {                                      // ';': the checksum, the end
      if (n === limit && cnt === checksum(out)) return out;
      break;
    }
    if (n + cnt > limit) break;
    if (op === 64) {                                      // '@': copy from the source
      const ofst = int();
      if (delta[p++] !== 44 || ofst + cnt > source.length) break;
      out.set(source.subarray(ofst, ofst + cnt), n);
    } else if (op === 58 && p + cnt <= delta.length) {    // ':': literal bytes
      out.set(delta.subarray(p, p + cnt), n);
      p += cnt;
    } else {
      break;
    }
    n += cnt;
  }
  throw new Error('fossil: bad delta or base');
}
