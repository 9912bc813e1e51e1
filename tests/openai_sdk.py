"""The official `openai` Python SDK against a real `ferrite serve` (run by .ci/run).

    python tests/openai_sdk.py target/debug/ferrite tests/fixtures/qwen3

Starts the server on a free port with an API key (and the Hermes-style test template, so tool
turns render), then checks what SDK users touch: models, completions, chat (n > 1), streaming
with include_usage (same text as non-streamed), structured output through
`parse(response_format=PydanticModel)`, a tool-calling round trip (a forced call parsed into a
pydantic model, the same call streamed through the SDK's stream helper, the result turn sent
back), embeddings (base64 and float), the Responses API (whole, streamed, a forced function
call), and the error classes the SDK raises from ferrite's status codes. Exits non-zero on the
first failure.
"""

import json
import pathlib
import signal
import subprocess
import sys
from typing import Literal

import openai
import pydantic

binary, model_dir = sys.argv[1], sys.argv[2]
KEY = "sk-ferrite-ci"
TEMPLATE = pathlib.Path(__file__).resolve().parent / "fixtures/chat_tools/hermes.jinja"
server = subprocess.Popen(
    [binary, "serve", "--model", model_dir, "--served-model-name", "tiny", "--port", "0",
     "--api-key", KEY, "--kv-cache-blocks", "128", "--chat-template", str(TEMPLATE)],
    stderr=subprocess.PIPE, text=True, env={"FERRITE_LOG": "warn", "PATH": "/usr/bin:/bin"},
)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr, flush=True)  # the exit status below would hide it
        server.kill()
        sys.exit(f"FAIL: {what}")
    checks += 1


try:
    base = None
    for line in server.stderr:
        if "http://" in line:
            base = line.strip().split("http://")[1]
            break
    check(base is not None, "the server announced its address")
    client = openai.OpenAI(base_url=f"http://{base}/v1", api_key=KEY, max_retries=0)

    models = client.models.list()
    check([m.id for m in models.data] == ["tiny"], f"models: {models}")

    # ignore_eos (vLLM's extra): exactly max_tokens tokens, whatever the random model predicts.
    c = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    check(c.object == "text_completion" and len(c.choices) == 1, f"completion: {c}")
    check(c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length", f"completion usage: {c}")
    check(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, "total_tokens")

    messages = [{"role": "user", "content": "Tell me a story"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, n=2)
    check(len(chat.choices) == 2 and chat.choices[0].message.role == "assistant", f"chat n=2: {chat}")
    check(chat.choices[0].message.content == chat.choices[1].message.content, "greedy samples agree")

    single = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finishes, ids = "", None, 0, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "the usage chunk has no choices")
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finishes += choice.finish_reason is not None
    check(text == single.choices[0].message.content, f"streamed {text!r} == non-streamed")
    check(usage is not None and usage.completion_tokens == single.usage.completion_tokens, f"usage {usage}")
    check(finishes == 1 and len(ids) == 1, f"one finish_reason ({finishes}), one id ({ids})")

    # Structured output: the SDK's own parse() turns a pydantic model into a strict JSON schema;
    # the random model's noise is valid only because the server constrains it.
    class Weather(pydantic.BaseModel):
        sky: Literal["clear", "cloudy", "rain"]
        celsius: int = pydantic.Field(ge=-9, le=40)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(3):
        parsed = parse(model="tiny", messages=messages, response_format=Weather, max_tokens=400,
                       temperature=1.0, seed=seed)
        choice = parsed.choices[0]
        check(choice.finish_reason == "stop", f"parse() finished by its grammar: {parsed}")
        check(isinstance(choice.message.parsed, Weather), f"parse() gave a Weather: {parsed}")

    # Tool calling: the SDK's pydantic_function_tool gives a strict schema; a forced call's
    # arguments parse into the model, streamed or not; the result turn goes back in.
    class GetWeather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)
        unit: Literal["celsius", "fahrenheit"]

    tools = [openai.pydantic_function_tool(GetWeather)]
    asked = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                 tool_choice="required", parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=4)
    called = parse(**asked)
    choice = called.choices[0]
    check(choice.finish_reason == "tool_calls" and choice.message.content is None, f"a forced call: {called}")
    call = choice.message.tool_calls[0]
    check(call.function.name == "GetWeather" and call.id.startswith("call_"), f"the call: {call}")
    check(isinstance(call.function.parsed_arguments, GetWeather), f"arguments parse into the model: {call}")
    stream_helper = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream
    with stream_helper(**asked) as events:
        final = events.get_final_completion()
    streamed_call = final.choices[0].message.tool_calls[0]
    check((streamed_call.function.name, streamed_call.function.arguments)
          == (call.function.name, call.function.arguments), f"streamed {streamed_call} == whole {call}")
    history = asked["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})},
    ]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=tools, tool_choice="none",
                                            max_tokens=4)
    check(answer.choices[0].message.tool_calls is None and answer.usage.prompt_tokens > 50,
          f"the result turn is accepted and rendered: {answer}")

    # Embeddings: the SDK asks for base64 by default and decodes it; floats must agree with it.
    texts = ["Hello", "Once upon a time"]
    packed = client.embeddings.create(model="tiny", input=texts)
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    check([d.index for d in packed.data] == [0, 1] and len(packed.data[0].embedding) == 64,
          f"a vector per input, in order, at the model's width: {packed.data}")
    check(all(abs(a - b) < 1e-6 for p, f in zip(packed.data, floats.data) for a, b in zip(p.embedding, f.embedding)),
          "base64 (decoded by the SDK) and float vectors agree")
    check(abs(sum(x * x for x in floats.data[1].embedding) - 1) < 1e-4, "a decoder's last token, normalised")
    check(packed.usage.prompt_tokens == packed.usage.total_tokens > 2, f"usage counts the inputs: {packed.usage}")
    try:
        client.embeddings.create(model="tiny", input="x", dimensions=8)
        check(False, "dimensions on a model without Matryoshka widths raises")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "dimensions", f"BadRequestError names dimensions: {e.body}")

    # The Responses API, whole and streamed: the SDK's own types parse both.
    response = client.responses.create(model="tiny", instructions="Be brief.", input="Hello", max_output_tokens=8,
                                       temperature=0)
    check(response.status == "incomplete" and response.output_text and response.usage.output_tokens == 8,
          f"a response cut by max_output_tokens: {response}")
    with client.responses.create(model="tiny", instructions="Be brief.", input="Hello", max_output_tokens=8,
                                 temperature=0, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(kinds[0] == "response.created" and kinds[-1] == "response.incomplete" and deltas == response.output_text,
          f"streamed events add up to the whole response: {kinds}")
    pick = {"type": "function", "name": "pick", "parameters": {"type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
            "additionalProperties": False}}
    called = client.responses.create(model="tiny", input="Pick a number", tools=[pick], tool_choice="required",
                                     max_output_tokens=560, temperature=0)
    calls = [item for item in called.output if item.type == "function_call"]
    check(calls and all(c.name == "pick" and 0 <= json.loads(c.arguments)["n"] <= 9 for c in calls),
          f"a forced function tool gives function_call items: {called.output}")
    try:
        client.responses.create(model="tiny", input="x", previous_response_id="resp_1")
        check(False, "previous_response_id raises")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "previous_response_id", f"BadRequestError names it: {e.body}")

    try:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check("nope" in str(e), f"NotFoundError names the model: {e}")
    try:
        openai.OpenAI(base_url=f"http://{base}/v1", api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong key raises")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.body is not None, f"a wrong key is a 401 with an error body: {e}")
    try:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=5)
        check(False, "temperature 5 raises")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"BadRequestError names the param: {e.body}")
finally:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        if code != 0:
            sys.exit(f"FAIL: exit status {code} after SIGTERM")

print(f"openai SDK {openai.__version__}: {checks} checks passed")
