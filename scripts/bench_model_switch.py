# Time to switch models under --max-loaded-models 1: a 1-token request to the model not loaded
# (unload the other + load it + the request), against the same request to the loaded model and
# against a fresh `ferrite serve` process from spawn to that request's answer (what a proxy that
# restarts servers, like llama-swap, pays).
#
#   python3 scripts/bench_model_switch.py target/release/ferrite MODEL_DIR ROUNDS
import json, re, statistics, subprocess, sys, threading, time, urllib.request

bin_, model, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])


def serve(*flags):
    """`ferrite serve` on a free port with `flags`; the process and its address."""
    p = subprocess.Popen([bin_, "serve", "--port", "0", "--kv-cache-gib", "0.5", *flags],
                         stderr=subprocess.PIPE, text=True, env={"FERRITE_LOG": "warn", "PATH": "/usr/bin:/bin"})
    while True:
        line = p.stderr.readline()
        if not line:
            sys.exit("server exited")
        found = re.search(r"http://(\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, found.group(1)


def ask(addr, name):
    """Seconds to the answer of a 1-token completion for model `name`."""
    body = json.dumps({"model": name, "prompt": "Once upon a time", "max_tokens": 1}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"content-type": "application/json"})
    t = time.perf_counter()
    urllib.request.urlopen(req).read()
    return time.perf_counter() - t


p, addr = serve("--model", f"a={model}", "--model", f"b={model}", "--max-loaded-models", "1")
for _ in range(3):
    ask(addr, "a")
warm, switch = [], []
current = "a"
for _ in range(rounds):
    warm.append(ask(addr, current))
    current = "b" if current == "a" else "a"
    switch.append(ask(addr, current))
m = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
loads = dict(re.findall(r'ferrite:model_load_seconds_sum\{model_name="(\w)"\} (\S+)', m))
counts = dict(re.findall(r'ferrite:model_load_seconds_count\{model_name="(\w)"\} (\S+)', m))
p.terminate(); p.wait()

restarts = []
for _ in range(max(3, rounds // 2)):
    t = time.perf_counter()
    q, fresh = serve("--model", model)
    ask(fresh, model)
    restarts.append(time.perf_counter() - t)
    q.terminate(); q.wait()

med = statistics.median
print(json.dumps({"rounds": rounds, "warm_request_ms_median": med(warm) * 1e3,
                  "switch_request_ms_median": med(switch) * 1e3, "switch_ms_min": min(switch) * 1e3,
                  "switch_ms_max": max(switch) * 1e3,
                  "fresh_process_to_answer_ms_median": med(restarts) * 1e3,
                  "load_seconds_mean": {k: float(loads[k]) / float(counts[k]) for k in loads}}))
