import { FanoutProvider } from '@fanout/client/react';
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { App } from './App.js';

const q = new URLSearchParams(location.search);
const url = q.get('ws') ?? `ws://${location.hostname || '127.0.0.1'}:3004/ws`;
const auth = q.get('auth') ?? undefined;

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <FanoutProvider url={url} options={{ token: auth, logger: console }}>
      <App initialToken={q.get('token')} />
    </FanoutProvider>
  </StrictMode>,
);
