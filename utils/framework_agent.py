"""The same agent in a maintained framework: smolagents' ToolCallingAgent. Shown in lesson 16.

A framework gives you the loop (utils.agent's job), memory, retries and logging; you give it tools and a
model. Here smolagents drives the course server through its `OpenAIModel` (the official openai client
underneath), with the course's tools wrapped as smolagents `Tool`s. Two things differ from the loop
written from scratch, and both show in the agreement lesson 16 measures:

* smolagents requires a tool call at every step (tool_choice "required") and ends a run when the model
  calls its built-in `final_answer` tool; our loop ends on plain text;
* its default system prompt is ~2,000 tokens of examples; `short_prompt_templates` replaces it with the
  course's one-paragraph prompt, which a 135M model on a CPU can afford.
"""

from __future__ import annotations

from utils.agent import AGENT_SYSTEM


def smolagents_tool(tool):
    """A utils.agent Tool as a smolagents Tool (string arguments, string output)."""
    from smolagents import Tool as SmolTool

    props = tool.parameters.get("properties", {})

    class Wrapped(SmolTool):
        name = tool.name
        description = tool.description
        inputs = {k: {"type": "string", "description": k} for k in props}
        output_type = "string"
        skip_forward_signature_validation = True  # forward(**kwargs): the arguments come from the schema

        def forward(self, **kwargs):
            return tool.function(**kwargs)

    return Wrapped()


def short_prompt_templates() -> dict:
    """smolagents' ToolCallingAgent templates with the course's short system prompt."""
    import importlib.resources

    import yaml

    templates = yaml.safe_load(importlib.resources.files("smolagents.prompts")
                               .joinpath("toolcalling_agent.yaml").read_text())
    templates["system_prompt"] = (AGENT_SYSTEM + " When you know the answer, call final_answer with it.")
    return templates


def run_smolagents(base_url: str, question: str, tools, model_id: str = "SmolLM2-135M-Instruct",
                   max_steps: int = 3, max_tokens: int = 96, http_client=None) -> dict:
    """Run smolagents' ToolCallingAgent on one question against an OpenAI-compatible server.

    Returns {"answer": str or None, "tools": [names called, in order], "steps": model calls}.
    Example: run_smolagents(server.base_url, "What is 347 * 28?", tools)["answer"]
    """
    from smolagents import OpenAIModel, ToolCallingAgent

    client_kwargs = {"http_client": http_client} if http_client is not None else {}
    model = OpenAIModel(model_id=model_id, api_base=base_url, api_key="unused", client_kwargs=client_kwargs,
                        temperature=0, max_tokens=max_tokens)
    agent = ToolCallingAgent(tools=[smolagents_tool(t) for t in tools], model=model, max_steps=max_steps,
                             prompt_templates=short_prompt_templates(), verbosity_level=0)
    result = agent.run(question, return_full_result=True)
    called = [call.name for step in agent.memory.steps for call in (getattr(step, "tool_calls", None) or [])]
    answer = result.output if result.state == "success" else None
    return {"answer": None if answer is None else str(answer), "tools": called,
            "steps": len([s for s in agent.memory.steps if getattr(s, "model_output_message", None)])}
