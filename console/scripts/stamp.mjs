// Writes dist/.source-hash: a hash of the console's sources, so that
// crates/console/build.rs knows whether dist/ is current without comparing
// file times (which a git checkout does not keep). Keep the algorithm in
// step with `source_hash` in crates/console/build.rs: FNV-1a 64 over the
// sorted relative paths, each followed by a NUL, the file's bytes and a NUL.

import { readdirSync, readFileSync, statSync, writeFileSync, existsSync } from 'node:fs'
import { dirname, join, relative, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
export const INPUTS = ['index.html', 'package.json', 'package-lock.json', 'vite.config.ts', 'tsconfig.json', 'tsconfig.app.json', 'tsconfig.node.json', 'src']

function walk(p, out) {
  if (!existsSync(p)) return
  if (statSync(p).isDirectory()) for (const e of readdirSync(p)) walk(join(p, e), out)
  else out.push(p)
}

const files = []
for (const i of INPUTS) walk(join(root, i), files)
const rel = files.map((f) => relative(root, f).split(sep).join('/')).sort()

const PRIME = 0x100000001b3n
const MASK = 0xffffffffffffffffn
let h = 0xcbf29ce484222325n
const eat = (bytes) => {
  for (const b of bytes) h = ((h ^ BigInt(b)) * PRIME) & MASK
}
for (const r of rel) {
  eat(Buffer.from(r, 'utf8'))
  eat([0])
  eat(readFileSync(join(root, r)))
  eat([0])
}
const hex = h.toString(16).padStart(16, '0')
writeFileSync(join(root, 'dist', '.source-hash'), hex + '\n')
console.log(`dist/.source-hash ${hex} (${rel.length} source files)`)
