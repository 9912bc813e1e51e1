#!/usr/bin/env bash
# scripts/browser-cors-check.sh — CORS in a real browser: headless Chromium (Debian's `chromium`)
# loads a page from one origin that calls a `ferrite serve` on another with fetch() (a POST
# with Authorization and a JSON body, so the browser sends a preflight first). From the allowed
# origin the completion must arrive; from another origin the browser must block it. Not in CI
# (a 300 MB browser); run it by hand:
#
#   scripts/browser-cors-check.sh [path/to/ferrite]   (default target/release/ferrite)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/target/release/ferrite}
command -v chromium >/dev/null || { echo "needs chromium (apt-get install chromium)" >&2; exit 2; }
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
api=$(free_port)
allowed=$(free_port)
other=$(free_port)
"$bin" serve --model "$root/tests/fixtures/qwen3" --served-model-name tiny --port "$api" \
    --api-key sk-browser --allowed-origins "http://127.0.0.1:$allowed" 2> "$work/serve.log" &
pids+=($!)
for _ in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$api/health" 2>/dev/null && break
    sleep 0.1
done

cat > "$work/page.html" <<HTML
<!doctype html>
<html><body><pre id="out">pending</pre>
<script>
fetch("http://127.0.0.1:$api/v1/chat/completions", {
  method: "POST",
  headers: {"Authorization": "Bearer sk-browser", "Content-Type": "application/json"},
  body: JSON.stringify({model: "tiny", messages: [{role: "user", content: "Hi"}], max_tokens: 5})
})
  .then(r => r.json())
  .then(j => { document.getElementById("out").textContent = "ANSWERED " + j.object + " " + j.usage.completion_tokens; })
  .catch(e => { document.getElementById("out").textContent = "BLOCKED " + e.name; });
</script></body></html>
HTML
for port in "$allowed" "$other"; do
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work" > /dev/null 2>&1 &
    pids+=($!)
done
sleep 1

visit() {
    chromium --headless=new --no-sandbox --disable-gpu --no-first-run --user-data-dir="$work/profile-$1" \
        --virtual-time-budget=20000 --dump-dom "http://127.0.0.1:$1/page.html" 2> /dev/null \
        | grep -o '<pre id="out">[^<]*' | sed 's/<pre id="out">//'
}
from_allowed=$(visit "$allowed")
from_other=$(visit "$other")
echo "chromium $(chromium --version 2>/dev/null | awk '{print $2}'): page on :$allowed (allowed) -> $from_allowed"
echo "chromium: page on :$other (not allowed) -> $from_other"
[[ $from_allowed == "ANSWERED chat.completion 5" ]] || { echo "browser-cors-check: the allowed origin was not answered" >&2; exit 1; }
[[ $from_other == BLOCKED* ]] || { echo "browser-cors-check: another origin was not blocked" >&2; exit 1; }
echo "browser-cors-check: clean"
