import { useConnectionState, useThrottle } from '@fanout/client/react';
import { useState } from 'react';
import { TokenDetail } from './TokenDetail.js';
import { TokenList } from './TokenList.js';

/** The connection and throttle notices the plan asks for (level, percent, dropped). */
function Status() {
  const state = useConnectionState();
  const throttle = useThrottle();
  return (
    <>
      <div className="state">connection: <span id="conn">{state}</span></div>
      {throttle && throttle.level > 0 && (
        <div className="banner" id="throttle" data-level={throttle.level}>
          {throttle.message} ({throttle.rate_percent}%, {throttle.dropped} skipped)
        </div>
      )}
    </>
  );
}

export function App({ initialToken }: { initialToken: string | null }) {
  const [selected, setSelected] = useState<string | null>(initialToken);
  return (
    <main>
      <Status />
      <h1>Trending</h1>
      <TokenList selected={selected} onSelect={setSelected} />
      {selected && <TokenDetail key={selected} id={selected} />}
    </main>
  );
}
