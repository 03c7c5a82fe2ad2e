"""The course's shared code: what one lesson builds and later lessons import.

One concept per module (see README's lesson map):
    utils.env           seeding, thread count, quiet libraries, environment report   (lesson 00)
    utils.models        load_chat_model(), load_embedder(): the offline, verified models (lesson 00)
    utils.data          python_docs(), shakespeare(), the course's own data sets        (lesson 00)
    utils.colab         installs what Colab lacks (run by the notebooks' setup cell)    (lesson 00)
    utils.tokenization  byte-level BPE from scratch: train, encode, decode, save/load   (lesson 01)
    utils.costs         tokens -> context use and money; API vs self-hosting          (lessons 01, 11)
    utils.positions     learned, sinusoidal and rotary (RoPE) positions                 (lesson 02)
    utils.attention     scaled dot-product and multi-head attention, KVCache            (lesson 03)
    utils.gpt           GPT (nanoGPT-style) and Llama (loads SmolLM2's weights)         (lesson 04)
    utils.training      batches, AdamW + warm-up/cosine loop, checkpoints, resume       (lesson 05)
    utils.sampling      temperature / top-k / top-p, generate() with a KV cache         (lesson 06)
    utils.prompting     chat prompts, scoring, batched and constrained generation       (lesson 07)
    utils.lora          LoRALinear, add_lora, merge_lora, save/load adapters            (lesson 08)
    utils.quantization  blockwise int8 / int4 / NF4, QuantizedLinear                    (lesson 08)
    utils.rag           chunk_text, build_retriever, evaluation, grounded prompts       (lesson 09)
    utils.vectordb      FAISS index families, recall, persistence, metadata filters     (lesson 10)
    utils.serving       an OpenAI-compatible chat server (FastAPI) for the local model  (lesson 11)
    utils.local_inference  GGUF internals, int8 dynamic quantisation, bandwidth maths   (lesson 11)
    utils.limits        probes for hallucination, arithmetic, long context, consistency (lesson 12)
    utils.alignment     SFT, reward-model loss, DPO from scratch                        (lesson 12)
Modules are imported explicitly (`from utils.models import load_chat_model`) so that importing
`utils` itself stays instant.
"""

__version__ = "0.1.0"
