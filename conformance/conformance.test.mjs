// The official Durable Streams server conformance suite, pointed at a running
// chatd (tests/test_durable_streams.py starts one and sets DS_BASE_URL). The
// package's own CLI finds no tests when installed from the registry (vitest
// excludes node_modules), so the suite runs from this file.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) throw new Error("set DS_BASE_URL to a running chatd, e.g. http://127.0.0.1:8765")

runConformanceTests({ baseUrl, longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS || 20000) })
