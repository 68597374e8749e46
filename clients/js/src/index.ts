/**
 * @fanout/client: the browser/Node.js client of a fanout node (PROTOCOL.md 1.2).
 *
 *   import { connect } from '@fanout/client';
 *   const client = connect('wss://ws.example.com/ws', { getToken });
 *   const sub = client.subscribe(['odin.token.*.update'], { snapshot: true });
 *   sub.on('message', (msg) => render(msg.channel, msg.data));
 *   client.on('reset', () => reloadFromApi());
 */
export {
  FanoutClient, Subscription, connect, backoff, tokenExp,
  type ClientOptions, type ClientEvents, type ConnectionState, type ThrottleInfo, type ErrorInfo,
  type ResumeInfo, type ResetInfo, type CloseInfo, type SnapshotInfo, type SubscribeResult,
  type SubscriptionEvents, type WebSocketLike, type WebSocketCtor, type NetworkMonitor,
} from './client.js';
export { Tracker, subjectMatches, type DataMessage } from './tracker.js';
