//! A real OpenAI client (the `async-openai` crate) against the real `ferrite serve` binary on
//! the qwen3 fixture: models, completions and chat, streamed and not, n > 1, logprobs, echo,
//! stop strings, seeds, usage, and the client's error types for 400, 401 and 404.

mod common;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CompletionFinishReason, CreateChatCompletionRequestArgs, FinishReason, Prompt, StopConfiguration,
};
use async_openai::types::completions::{CreateCompletionRequestArgs, CreateCompletionResponse};
use async_openai::Client;
use futures::StreamExt;

const KEY: &str = "sk-test-key";

fn client(addr: &str, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(OpenAIConfig::new().with_api_base(format!("http://{addr}/v1")).with_api_key(key))
}

/// The server's status and error body, from a failed call.
fn api_error(e: OpenAIError) -> (u16, async_openai::error::ApiError) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error),
        other => panic!("expected an API error, got {other}"),
    }
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default().content(text).build().unwrap().into()
}

/// Completion tokens of a response, counted from its logprobs.
fn logprob_tokens(r: &CreateCompletionResponse) -> usize {
    r.choices.iter().map(|c| c.logprobs.as_ref().unwrap().tokens.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_gets_what_it_asks_for() {
    // Killed when dropped, a failed assertion included.
    let server = common::Served::start(&["--api-key", KEY], None);
    exercise(&server.addr).await;
}

async fn exercise(addr: &str) {
    let c = client(addr, KEY);

    // Models.
    let models = c.models().list().await.unwrap();
    assert_eq!(models.data.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["tiny"]);
    assert_eq!(c.models().retrieve("tiny").await.unwrap().id, "tiny");

    // Completion, greedy, with logprobs; then the same streamed with usage.
    let greedy = CreateCompletionRequestArgs::default()
        .model("tiny")
        .prompt("Once upon a time")
        .max_tokens(16u32)
        .temperature(0.0)
        .logprobs(2u8)
        .build()
        .unwrap();
    let plain = c.completions().create(greedy.clone()).await.unwrap();
    assert_eq!(plain.choices.len(), 1);
    let text = plain.choices[0].text.clone();
    let usage = plain.usage.clone().unwrap();
    assert_eq!(usage.completion_tokens as usize, logprob_tokens(&plain));
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
    let lp = plain.choices[0].logprobs.as_ref().unwrap();
    assert!(lp.token_logprobs.iter().all(|l| l.is_some_and(|l| l <= 0.0)), "{lp:?}");
    assert!(lp.top_logprobs.iter().all(|t| (1..=2).contains(&t.as_object().unwrap().len())));

    let mut streamed_req = greedy.clone();
    streamed_req.stream_options =
        Some(ChatCompletionStreamOptions { include_usage: Some(true), ..Default::default() });
    let mut stream = c.completions().create_stream(streamed_req).await.unwrap();
    let (mut streamed, mut finishes, mut streamed_usage, mut ids) = (String::new(), 0, None, vec![]);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ids.push(chunk.id.clone());
        for choice in &chunk.choices {
            streamed.push_str(&choice.text);
            finishes += usize::from(choice.finish_reason.is_some());
        }
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            streamed_usage = Some(u);
        }
    }
    assert_eq!(streamed, text, "streamed text equals the non-streamed text");
    assert_eq!(finishes, 1, "one finish_reason");
    assert_eq!(streamed_usage.as_ref(), Some(&usage));
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "every chunk has the same id");

    // Stop string: cut where the greedy text first shows it, finish_reason stop.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "the greedy text is long enough to cut: {text:?}");
    let stop: String = chars[4..6].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut stopped_req = greedy.clone();
    stopped_req.stop = Some(StopConfiguration::String(stop.clone()));
    let stopped = c.completions().create(stopped_req).await.unwrap();
    assert_eq!(stopped.choices[0].text, text[..cut], "cut before {stop:?}");
    assert_eq!(stopped.choices[0].finish_reason, Some(CompletionFinishReason::Stop));

    // Seeded sampling with n = 2: reproducible, and usage counts both choices.
    let seeded = CreateCompletionRequestArgs::default()
        .model("tiny")
        .prompt(Prompt::StringArray(vec!["The cat".into(), "A dog".into()]))
        .max_tokens(10u32)
        .temperature(1.0)
        .seed(7)
        .n(2u8)
        .logprobs(0u8)
        .build()
        .unwrap();
    let a = c.completions().create(seeded.clone()).await.unwrap();
    let b = c.completions().create(seeded).await.unwrap();
    assert_eq!(a.choices.len(), 4, "two prompts, two choices each");
    let texts = |r: &CreateCompletionResponse| r.choices.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b), "same seed, same samples");
    assert_eq!(a.choices.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(a.usage.as_ref().unwrap().completion_tokens as usize, logprob_tokens(&a));

    // Echo with logprobs: the prompt's tokens come first, the first with a null logprob.
    let mut echoed_req = greedy.clone();
    echoed_req.echo = Some(true);
    let echoed = c.completions().create(echoed_req).await.unwrap();
    let choice = &echoed.choices[0];
    assert_eq!(choice.text, format!("Once upon a time{text}"));
    let lp = choice.logprobs.as_ref().unwrap();
    let prompt_tokens = echoed.usage.as_ref().unwrap().prompt_tokens as usize;
    assert_eq!(lp.tokens.len(), prompt_tokens + usage.completion_tokens as usize);
    assert!(lp.token_logprobs[0].is_none());
    assert!(lp.token_logprobs[1..].iter().all(Option::is_some));
    assert_eq!(
        lp.token_logprobs[prompt_tokens..],
        plain.choices[0].logprobs.as_ref().unwrap().token_logprobs[..]
    );

    // Chat, with logprobs, n = 2; then streamed.
    let chat = CreateChatCompletionRequestArgs::default()
        .model("tiny")
        .messages(vec![user("Tell me a story")])
        .max_completion_tokens(12u32)
        .temperature(0.0)
        .logprobs(true)
        .top_logprobs(2u8)
        .n(2u8)
        .build()
        .unwrap();
    let reply = c.chat().create(chat.clone()).await.unwrap();
    assert_eq!(reply.choices.len(), 2);
    let answer = reply.choices[0].message.content.clone().unwrap();
    assert_eq!(reply.choices[1].message.content.as_deref(), Some(answer.as_str()), "greedy: both the same");
    let content = reply.choices[0].logprobs.as_ref().unwrap().content.as_ref().unwrap();
    assert_eq!(content.len() * 2, reply.usage.as_ref().unwrap().completion_tokens as usize);
    assert!(content.iter().all(|t| t.top_logprobs.len() == 2 && t.top_logprobs[0].logprob == t.logprob));

    let mut streamed_chat = chat;
    streamed_chat.n = Some(1);
    streamed_chat.stream_options =
        Some(ChatCompletionStreamOptions { include_usage: Some(true), ..Default::default() });
    let mut stream = c.chat().create_stream(streamed_chat).await.unwrap();
    let (mut text, mut roles, mut finish, mut usage) = (String::new(), 0, vec![], None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in &chunk.choices {
            roles += usize::from(choice.delta.role.is_some());
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
            finish.extend(choice.finish_reason);
        }
        usage = chunk.usage.or(usage);
    }
    assert_eq!(text, answer);
    assert_eq!(roles, 1, "the first chunk carries the role");
    assert_eq!(finish.len(), 1);
    assert!(matches!(finish[0], FinishReason::Stop | FinishReason::Length));
    assert_eq!(usage.unwrap().completion_tokens * 2, reply.usage.unwrap().completion_tokens);

    // Errors reach the client as OpenAI's: 404 naming the model, 400 naming the field, 401.
    let mut unknown = greedy.clone();
    unknown.model = "nope".into();
    let (status, e) = api_error(c.completions().create(unknown).await.unwrap_err());
    assert_eq!(status, 404);
    assert!(e.message.contains("nope") && e.message.contains("tiny"), "{}", e.message);

    let mut hot = greedy.clone();
    hot.temperature = Some(5.0);
    let (status, e) = api_error(c.completions().create(hot).await.unwrap_err());
    assert_eq!((status, e.param.as_deref()), (400, Some("temperature")), "{}", e.message);

    let (status, e) = api_error(client(addr, "sk-wrong").models().list().await.unwrap_err());
    assert_eq!(status, 401, "{}", e.message);
}
