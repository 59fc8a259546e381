// Builds the page into dist/: index.html, assets/app.js and assets/app.css (xterm's stylesheet
// bundled in), and assets/done.js (the script of the gateway's /auth/done page, which closes the
// sign-in popup). No CDN and no inline script: the gateway serves these with `script-src 'self'`.
import { build } from 'esbuild';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, 'dist');
const dev = process.argv.includes('--dev');

rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, 'assets'), { recursive: true });

const common = {
  absWorkingDir: root,
  outdir: join(dist, 'assets'),
  bundle: true,
  platform: 'browser',
  target: ['chrome110', 'firefox115', 'safari16'],
  minify: !dev,
  sourcemap: dev ? 'inline' : false,
  legalComments: 'eof',
  logLevel: 'warning',
  charset: 'utf8',
};
// The page: an ES module (index.html loads it with type="module").
await build({ ...common, entryPoints: { app: 'src/main.ts' }, format: 'esm' });
// /auth/done's script: an IIFE, so it works whether the gateway's page loads it as a module or not.
await build({ ...common, entryPoints: { done: 'src/done.ts' }, format: 'iife' });
copyFileSync(join(root, 'src/index.html'), join(dist, 'index.html'));
copyFileSync(join(root, 'src/favicon.svg'), join(dist, 'assets', 'favicon.svg'));
console.log(`built ${dist}`);
