/**
 * fanout-worker.js (built from this file, with the client bundled in): the
 * owner of a browser's one connection (mux.ts). Run as a SharedWorker (named
 * by shared.ts with the key: URL and user), it serves each tab's port; loaded
 * with import() by the leader tab where there is no SharedWorker, it gives the
 * tab the `Mux` to run.
 */
import { Mux } from './mux.js';

export { Mux };

const g = globalThis as Record<string, any>;     // eslint-disable-line @typescript-eslint/no-explicit-any
if (typeof g.SharedWorkerGlobalScope === 'function' && g instanceof g.SharedWorkerGlobalScope) {
  const mux = new Mux(g.name);
  g.onconnect = (e: MessageEvent) => {
    const port = e.ports[0]!;
    const post = (m: Record<string, unknown>) => port.postMessage(m);
    port.onmessage = (ev) => mux.handle(ev.data, post);
    post({ o: 'hi' });
  };
}
