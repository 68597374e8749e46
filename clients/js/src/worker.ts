/**
 * fanout-worker.js (built from this file, the client bundled in): one
 * connection per browser. Run as a SharedWorker (named by tab.ts with the
 * key: URL and user), it owns the connection (mux.ts) and serves each tab's
 * port. Loaded with import() by the core (shared.ts), it gives the tab its
 * side (tab.ts: `tunnel`, `token`), which runs the owner itself when the tab
 * is elected leader where there is no SharedWorker.
 */
import { Mux } from './mux.js';

export { Mux };
export { token, tunnel } from './tab.js';

const g = globalThis as Record<string, any>;
if (typeof g.SharedWorkerGlobalScope === 'function' && g instanceof g.SharedWorkerGlobalScope) {
  const mux = new Mux(g.name);
  g.onconnect = (e: MessageEvent) => {
    const port = e.ports[0]!;
    const post = (m: Record<string, unknown>) => port.postMessage(m);
    port.onmessage = (ev) => mux.handle(ev.data, post);
    post({ o: 'hi' });
  };
}
