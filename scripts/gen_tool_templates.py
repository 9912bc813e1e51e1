#!/usr/bin/env python3
"""Expected renderings of chat templates with tools, from transformers, for ferrite's tests.

For each template in tests/fixtures/chat_tools/*.jinja and each conversation below (OpenAI
request shapes: `tools`, assistant `tool_calls` with `arguments` as a JSON string, `tool`
messages, `chat_template_kwargs`), writes what transformers' `apply_chat_template(...,
tools=..., add_generation_prompt=True, tokenize=False, **kwargs)` renders into
tests/fixtures/chat_tools/cases.json. As vLLM does, an `arguments` string that parses as a JSON
object is handed to the template as that object. The qwen3 fixture's tokenizer supplies
bos_token and eos_token.

Run (from the repository root; needs only transformers, tokenizers and jinja2, no torch):
    /tmp/tf-venv/bin/python scripts/gen_tool_templates.py

Generated with transformers 5.24.0, tokenizers 0.23.3 (recorded in cases.json). Deterministic.
"""

import copy
import json
import pathlib

import transformers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/chat_tools"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city today.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "A city, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the café's menu.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10},
            "filters": {"type": "object", "properties": {"vegan": {"type": "boolean"}}}},
            "required": ["query"]}}},
]

CALL_PARIS = {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}
CALL_MENU = {"id": "call_2", "type": "function",
             "function": {"name": "search", "arguments": "{\"query\": \"soup\", \"limit\": 3}"}}

CASES = {
    "first_turn": {
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
    },
    "call_and_result": {
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
                     {"role": "user", "content": "And tomorrow?"}],
        "tools": TOOLS,
    },
    "parallel_calls": {
        "messages": [{"role": "user", "content": "Weather, and soup?"},
                     {"role": "assistant", "content": "Checking both.", "tool_calls": [CALL_PARIS, CALL_MENU]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
                     {"role": "tool", "tool_call_id": "call_2", "content": "tomato"}],
        "tools": TOOLS,
    },
    "no_tools": {
        "messages": [{"role": "system", "content": "Plain chat."},
                     {"role": "user", "content": "Hello"}],
        "tools": None,
    },
    "template_kwargs": {
        "messages": [{"role": "user", "content": "What day is it?"}],
        "tools": TOOLS[:1],
        "chat_template_kwargs": {"date_string": "5 Dec 2026"},
    },
}


def for_template(messages):
    """What vLLM hands the template: `arguments` strings parsed into objects."""
    messages = copy.deepcopy(messages)
    for m in messages:
        for call in m.get("tool_calls") or []:
            args = call["function"].get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    call["function"]["arguments"] = parsed
    return messages


def main():
    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests/fixtures/qwen3"))
    cases = []
    for path in sorted(OUT.glob("*.jinja")):
        template = path.read_text()
        for name, case in CASES.items():
            kwargs = case.get("chat_template_kwargs", {})
            text = tok.apply_chat_template(
                for_template(case["messages"]), tools=case["tools"], chat_template=template,
                add_generation_prompt=True, tokenize=False, **kwargs)
            request = {"messages": case["messages"]}
            if case["tools"] is not None:
                request["tools"] = case["tools"]
            if kwargs:
                request["chat_template_kwargs"] = kwargs
            cases.append({"template": path.name, "case": name, "request": request, "expected": text})
    out = {"versions": {"transformers": transformers.__version__,
                        "tokenizers": __import__("tokenizers").__version__},
           "cases": cases}
    (OUT / "cases.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
