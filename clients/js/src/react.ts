/**
 * React hooks for @fanout/client (`@fanout/client/react`; `react` >= 18 is a
 * peer dependency). One connection per app lives in <FanoutProvider>;
 * components subscribe on mount and unsubscribe on unmount, and a channel
 * two components use stays subscribed until both are gone (reference counts
 * in the client).
 */
import {
  createContext, createElement, useContext, useEffect, useRef, useState, useSyncExternalStore,
  type ReactNode,
} from 'react';
import { FanoutClient, type ClientOptions, type ConnectionState, type ThrottleInfo } from './client.js';
import type { DataMessage } from './tracker.js';

const Ctx = createContext<FanoutClient | null>(null);

export interface FanoutProviderProps {
  /** A client you made (and own); or `url` (+ `options`) for one the provider makes, connects and closes. */
  client?: FanoutClient;
  url?: string;
  options?: ClientOptions;
  children?: ReactNode;
}

/** Holds one client for the tree below it. */
export function FanoutProvider(props: FanoutProviderProps): ReactNode {
  const [own] = useState(() => (props.client ? null : new FanoutClient(props.options)));
  const client = props.client ?? own!;
  useEffect(() => {
    if (!own) return undefined;
    own.connect(props.url);
    return () => own.disconnect();
  }, [own, props.url]);
  return createElement(Ctx.Provider, { value: client }, props.children);
}

/** The provider's client (throws outside a FanoutProvider). */
export function useFanout(): FanoutClient {
  const c = useContext(Ctx);
  if (!c) throw new Error('fanout: useFanout/useChannel need a <FanoutProvider> above them');
  return c;
}

export type ChannelHandler = (msg: DataMessage) => void;
export interface ChannelOptions {
  /** Ask for the newest message of each matching subject first (PROTOCOL.md 1.1 `snapshot`). */
  snapshot?: boolean;
  /** Called on `reset` (messages may have been lost: reload state). */
  onReset?: () => void;
}

/**
 * Subscribe while mounted. `handler` gets every message of the channels
 * (snapshot ones too, flagged `snapshot: true`); the hook returns the newest
 * one. The handler may change between renders without resubscribing.
 */
export function useChannel<T = unknown>(
  channels: string | string[],
  handler?: ChannelHandler | ChannelOptions,
  options?: ChannelOptions,
): DataMessage<T> | undefined {
  const client = useFanout();
  const fn = typeof handler === 'function' ? handler : undefined;
  const opts = (typeof handler === 'object' ? handler : options) || {};
  const ref = useRef({ fn, opts });
  ref.current = { fn, opts };
  const [last, setLast] = useState<DataMessage<T> | undefined>(undefined);
  const key = JSON.stringify(typeof channels === 'string' ? [channels] : channels);
  const snapshot = !!opts.snapshot;
  useEffect(() => {
    const sub = client.subscribe(JSON.parse(key) as string[], { snapshot });
    const offMsg = sub.on('message', (msg) => {
      setLast((prev) => (prev && prev.channel === msg.channel && prev.stream_seq > msg.stream_seq ? prev : (msg as DataMessage<T>)));
      ref.current.fn?.(msg);
    });
    const offReset = sub.on('reset', () => ref.current.opts.onReset?.());
    return () => {
      offMsg();
      offReset();
      sub.unsubscribe();
    };
  }, [client, key, snapshot]);
  return last;
}

/**
 * The newest `data` of one subject: from the node's snapshot at once where
 * the node supports it, else from the first live message (undefined until then).
 */
export function useLatest<T = unknown>(channel: string): T | undefined {
  return useChannel<T>(channel, { snapshot: true })?.data;
}

/** 'connecting' | 'connected' | 'disconnected', re-rendering on change. */
export function useConnectionState(): ConnectionState {
  const client = useFanout();
  return useSyncExternalStore((cb) => client.on('state', cb), () => client.state, () => client.state);
}

/** The last `throttle_update` ({level, rate_percent, dropped, message}), or null while never throttled. */
export function useThrottle(): ThrottleInfo | null {
  const client = useFanout();
  return useSyncExternalStore((cb) => client.on('throttle_update', cb), () => client.throttle, () => client.throttle);
}
