"""The course's shared code: what one lesson builds and later lessons import.

One concept per module, each a one-sitting read (see README's lesson map):
    utils.env              seeding, thread count, quiet libraries, environment report          (lesson 00)
    utils.models           load_chat_model(), load_embedder(): the offline, verified models    (lesson 00)
    utils.data             python_docs(), shakespeare(), the course's own data sets             (lesson 00)
    utils.colab            installs what Colab lacks (run by the notebooks' setup cell)         (lesson 00)
    utils.checks           small argument checks: TypeError / ValueError that say what is allowed
    utils.tokenization     byte-level BPE from scratch: train, encode, decode, save/load        (lesson 01)
    utils.token_display    each token's bytes, readable and coloured                           (lesson 01)
    utils.costs            tokens -> context use and money; API vs self-hosting               (lessons 01, 11)
    utils.positions        learned, sinusoidal and rotary (RoPE) positions                      (lesson 02)
    utils.attention        scaled dot-product and multi-head attention, KVCache                 (lesson 03)
    utils.gpt              GPT (nanoGPT-style) and Llama (loads SmolLM2's weights)              (lesson 04)
    utils.training         batches, next-token loss, AdamW + warm-up/cosine training loop       (lesson 05)
    utils.checkpoints      save / resume a training run (safetensors + JSON, no pickle)         (lesson 05)
    utils.tiny_gpt         lesson 05's trained model, cached for later lessons                  (lesson 05)
    utils.sampling         temperature / top-k / top-p, generate() with a KV cache              (lesson 06)
    utils.prompting        chat prompts as the model sees them, scoring answers by likelihood   (lesson 07)
    utils.generation       generate_batch(): many replies at once (left padding, shared prefix) (lesson 07)
    utils.constrained      constrained decoding: a grammar the output cannot break              (lesson 07)
    utils.answers          reading replies: numbers, JSON, "I don't know", accepted answers     (lessons 07, 09, 12)
    utils.stats            Wilson intervals, McNemar, bootstrap, Cohen's kappa                 (lesson 07 onwards)
    utils.model_surgery    replace every nn.Linear of a model; count its weight bytes          (lessons 08, 11)
    utils.lora             LoRALinear, add_lora, merge_lora, save/load adapters                 (lesson 08)
    utils.quantization     blockwise int8 / int4 / NF4, QuantizedLinear                          (lesson 08)
    utils.chunking         splitting documents into chunks (fixed, paragraphs, sections)        (lesson 09)
    utils.bm25             keyword search from scratch (checked against rank-bm25)             (lesson 09)
    utils.embedding_cache  sentence embeddings computed once and cached on disk                (lesson 09)
    utils.retrieval_metrics  hit@k, MRR, evaluate_retrieval                                   (lesson 09)
    utils.injection        spotting and fencing instructions hidden in retrieved text          (lesson 09)
    utils.rag              build_retriever, grounded answers with citations, "I don't know"     (lesson 09)
    utils.vectordb         FAISS index families, recall, persistence, metadata filters          (lesson 10)
    utils.chat_request     checking an OpenAI chat-completions request (400s that say why)      (lesson 11)
    utils.serving          an OpenAI-compatible chat server (FastAPI) for the local model       (lesson 11)
    utils.server_process   starting and stopping that server as a child process (loopback only)  (lesson 11)
    utils.local_inference  GGUF internals, int8 dynamic quantisation, bandwidth maths          (lesson 11)
    utils.limits           probes for arithmetic and long context, built at run time            (lesson 12)
    utils.alignment        SFT, reward model, PPO, DPO and GRPO losses (checked against trl)  (lessons 13, 14)
    utils.reward_model     LLM + LoRA + scalar head, Bradley-Terry training; adapter swapping  (lesson 13)
    utils.ppo              PPO for an LLM: rollouts, KL penalty, value head + GAE, clipped loop (lesson 13)
    utils.evaluation       multiple choice by log-likelihood (checked against lm-eval)          (lesson 14, in progress)
    utils.distributed      lesson 05's training under torchrun: single, DDP, FSDP              (lesson 16, in progress)
Modules are imported explicitly (`from utils.models import load_chat_model`) so that importing
`utils` itself stays instant.
"""

__version__ = "0.1.0"
