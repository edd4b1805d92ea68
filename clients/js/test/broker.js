// A real `herd serve` process for the tests: the binary named by HERD_BIN
// (cargo test sets it), on a free port, killed when the test ends.

import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

export const BASIC = `
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 8
timeout_ms = 2000
max_sleep_ms = 5000
[[evaluator]]
fn = "echo"
kind = "echo"
threads = 2
[[evaluator]]
fn = "embed"
kind = "remote"
timeout_ms = 5000
`;

export async function startBroker(t, toml = BASIC, listen = "127.0.0.1:0") {
  const bin = process.env.HERD_BIN;
  if (!bin) throw new Error("HERD_BIN names the herd binary (cargo test sets it)");
  const dir = mkdtempSync(join(tmpdir(), "herd-js-"));
  const config = join(dir, "herd.toml");
  writeFileSync(config, toml);
  const child = spawn(bin, ["serve", "--listen", listen, "--log-format", "json", "--config", config], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const addr = await new Promise((resolve, reject) => {
    child.on("exit", (code) => reject(new Error(`herd serve exited with ${code}`)));
    lines.on("line", (line) => {
      try {
        const a = JSON.parse(line)?.fields?.addr;
        if (a) resolve(a);
      } catch {}
    });
  });
  const broker = {
    addr,
    url: `ws://${addr}/ws`,
    kill() {
      child.kill("SIGKILL");
    },
    exited: new Promise((r) => child.on("exit", r)),
  };
  t.after(() => child.kill("SIGKILL"));
  return broker;
}
