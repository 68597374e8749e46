// Apply Fossil deltas with the npm fossil-delta package (an independent
// decoder): reads a JSON array of {source, delta} (base64) on stdin, writes a
// JSON array of {target} (base64) or {error} on stdout.
import { applyDelta } from "fossil-delta";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const cases = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const out = cases.map(({ source, delta }) => {
  try {
    const target = applyDelta(new Uint8Array(Buffer.from(source, "base64")),
                              new Uint8Array(Buffer.from(delta, "base64")));
    return { target: Buffer.from(target).toString("base64") };
  } catch (err) {
    return { error: String(err && err.message ? err.message : err) };
  }
});
process.stdout.write(JSON.stringify(out));
