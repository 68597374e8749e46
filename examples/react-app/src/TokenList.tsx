import { useLatest } from '@fanout/client/react';
import type { TrendingUpdate } from './types.js';

/** The trending table (`odin.global.trending`): from the snapshot at once, then every 5 s. */
export function TokenList({ selected, onSelect }: { selected: string | null; onSelect: (id: string) => void }) {
  const trending = useLatest<TrendingUpdate>('odin.global.trending');
  const rows = trending?.data.top_100 ?? [];
  if (!trending) return <p id="trending-empty">Waiting for the trending list…</p>;
  return (
    <table id="trending">
      <thead>
        <tr><th>#</th><th>token</th><th>price</th><th>volume</th></tr>
      </thead>
      <tbody>
        {rows.map((t, i) => (
          <tr key={t.id} data-token={t.id} className={t.id === selected ? 'selected' : ''} onClick={() => onSelect(t.id)}>
            <td>{i + 1}</td><td>{t.id}</td><td>{t.price}</td><td>{t.volume}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
