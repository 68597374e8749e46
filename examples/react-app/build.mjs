// Bundle src/main.tsx into dist/app.js with esbuild; `--serve` also serves this folder
// on http://127.0.0.1:8080 (PORT) and rebuilds on change.
//
// alias: @fanout/client is a file: dependency (a symlink to clients/js, which has its own
// dev copy of react in its node_modules); its `react` import must resolve to this app's
// react: two Reacts in one page break hooks. (An app that installs the npm tarball has one.)
import { copyFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import * as esbuild from 'esbuild';

const here = createRequire(import.meta.url);
const react = dirname(here.resolve('react/package.json'));

const options = {
  entryPoints: ['src/main.tsx'],
  bundle: true,
  format: 'esm',
  target: 'es2020',
  outfile: 'dist/app.js',
  minify: true,
  sourcemap: true,
  alias: { react },
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'info',
};

// One connection per browser: the client loads fanout-worker.js from next to the bundle
// (new URL('./fanout-worker.js', import.meta.url)); esbuild does not copy it, so do it here.
mkdirSync('dist', { recursive: true });
copyFileSync(here.resolve('@fanout/client/fanout-worker.js'), 'dist/fanout-worker.js');

if (process.argv.includes('--serve')) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
  const { port } = await ctx.serve({ servedir: '.', host: '127.0.0.1', port: Number(process.env.PORT || 8080) });
  console.log(`open http://127.0.0.1:${port}/?ws=ws://127.0.0.1:3004/ws`);
} else {
  await esbuild.build(options);
}
