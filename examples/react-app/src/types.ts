/** Payload shapes examples/node-publisher sends (publisher.js). */

/** `odin.token.<id>.update`: the token object itself. */
export interface TokenUpdate {
  id: string;
  price: number;
  volume: number;
  holder_count?: number;
  updated_at?: number;
}

/** `odin.global.trending` every 5 s: `{type, data: {top_100}, ts}`. */
export interface TrendingUpdate {
  type: 'trending_update';
  data: { top_100: Array<Pick<TokenUpdate, 'id' | 'price' | 'volume'>> };
  ts: number;
}
