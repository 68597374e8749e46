// A type test: how an app uses @fanout/client, compiled with tsc --strict against the
// built .d.ts files (npm run typecheck). The @ts-expect-error lines must stay errors.
import { connect, type DataMessage, type ThrottleInfo } from '@fanout/client';
import { FanoutProvider, useChannel, useConnectionState, useLatest, useThrottle } from '@fanout/client/react';

interface Token { id: string; price: number }
interface Trending { type: 'trending_update'; data: { top_100: Token[] } }

const client = connect('ws://127.0.0.1:3004/ws', { getToken: async () => 'jwt' });
const sub = client.subscribe(['odin.token.*.update'], { snapshot: true });
sub.on('message', (msg: DataMessage) => console.log(msg.channel, msg.stream_seq, msg.snapshot));
client.on('state', (s) => { const ok: 'connecting' | 'connected' | 'disconnected' = s; void ok; });
client.on('throttle_update', (t: ThrottleInfo) => console.log(t.level, t.rate_percent, t.dropped));
client.on('reset', (r) => console.log(r.channels, r.reason));
client.on('message:odin.global.>', (msg) => console.log(msg.data));
// @ts-expect-error: not an event
client.on('no-such-event', () => {});
void sub.ready.then((r) => r.channels.concat(r.errors.map((e) => e.code)));
async function iterate(): Promise<number> {
  for await (const m of sub) return m.stream_seq;
  return 0;
}
void iterate();
sub.unsubscribe();
// One connection per browser: on by default; off, or the worker file's URL.
connect('ws://127.0.0.1:3004/ws', { shared: false }).disconnect();
connect('ws://127.0.0.1:3004/ws', { shared: '/static/fanout-worker.js' }).disconnect();
connect('ws://127.0.0.1:3004/ws', { shared: new URL('https://app.example/fanout-worker.js') }).disconnect();
// @ts-expect-error: not a URL
connect('ws://127.0.0.1:3004/ws', { shared: 3 });

function Price({ id }: { id: string }) {
  const t = useLatest<Token>(`odin.token.${id}.update`);
  const last = useChannel<Token>(`odin.token.${id}.update`, (m) => console.log(m.data));
  // @ts-expect-error: possibly undefined until the first message
  const p: number = t.price;
  void p;
  return <span>{t?.price ?? last?.data?.price ?? '-'}</span>;
}

function Trend() {
  const trending = useLatest<Trending>('odin.global.trending');
  const state = useConnectionState();
  const throttle = useThrottle();
  return (
    <ul data-state={state} data-level={throttle?.level ?? 0}>
      {trending?.data.top_100.map((t) => <li key={t.id}><Price id={t.id} /></li>)}
    </ul>
  );
}

export const app = <FanoutProvider url="ws://127.0.0.1:3004/ws" options={{ token: 'jwt' }}><Trend /></FanoutProvider>;
