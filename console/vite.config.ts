import preact from '@preact/preset-vite'
import { defineConfig } from 'vite'

// The console is served by `gpufleet up` at `/` (crates/console embeds dist/).
// `npm run dev` proxies the API to a local `gpufleet up` (GPUFLEET_URL, default 127.0.0.1:8080).
const api = process.env.GPUFLEET_URL ?? 'http://127.0.0.1:8080'

export default defineConfig({
  plugins: [preact()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    sourcemap: false,
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 300,
  },
  server: {
    proxy: { '/api': { target: api, changeOrigin: false } },
  },
  preview: {
    proxy: { '/api': { target: api, changeOrigin: false } },
  },
})
