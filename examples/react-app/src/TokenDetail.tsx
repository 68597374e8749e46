import { useChannel, useLatest } from '@fanout/client/react';
import { useState } from 'react';
import type { TokenUpdate } from './types.js';

/** One token's live price (`odin.token.<id>.update`), with how many updates came since mount. */
export function TokenDetail({ id }: { id: string }) {
  const token = useLatest<TokenUpdate>(`odin.token.${id}.update`);
  const [updates, setUpdates] = useState(0);
  // A second subscriber of the same channel: the client subscribes once and counts references.
  useChannel(`odin.token.${id}.update`, () => setUpdates((n) => n + 1));
  return (
    <section id="detail" data-token={id}>
      <h2>{id}</h2>
      {token ? (
        <>
          <div className="price" id="price">{token.price}</div>
          <div>volume <span id="volume">{token.volume}</span>, holders {token.holder_count ?? '?'}</div>
        </>
      ) : (
        <div id="price-empty">No update for {id} yet</div>
      )}
      <div className="state">updates since opened: <span id="updates">{updates}</span></div>
    </section>
  );
}
