// Bundle src/main.tsx into dist/app.js with esbuild; `--serve` also serves this folder
// on http://127.0.0.1:8080 (PORT) and rebuilds on change.
//
// preserveSymlinks: @fanout/client is a file: dependency (a symlink to clients/js), and
// its `react` import must resolve to this app's react, not clients/js's dev copy: two
// Reacts in one page break hooks.
import * as esbuild from 'esbuild';

const options = {
  entryPoints: ['src/main.tsx'],
  bundle: true,
  format: 'esm',
  target: 'es2020',
  outfile: 'dist/app.js',
  minify: true,
  sourcemap: true,
  preserveSymlinks: true,
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'info',
};

if (process.argv.includes('--serve')) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
  const { port } = await ctx.serve({ servedir: '.', host: '127.0.0.1', port: Number(process.env.PORT || 8080) });
  console.log(`open http://127.0.0.1:${port}/?ws=ws://127.0.0.1:3004/ws`);
} else {
  await esbuild.build(options);
}
