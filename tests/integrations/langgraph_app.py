"""A LangGraph agent for the LangGraph adapter's tests, and the worker the crash test
kills (``python tests/integrations/langgraph_app.py SESSION BASE_URL THREAD TEXT``).

The graph is hand-written (``langchain_openai`` is not installed): a ``model`` node
calls the real ``openai`` client against the test's local OpenAI-compatible server,
and a ``tools`` node runs the tool calls with :func:`sandbox_tools`.  Messages are
OpenAI-format dicts, so the state is plain JSON.
"""

from __future__ import annotations

import json
import operator
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

if __name__ == "__main__":  # run as a script: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import openai
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, StateGraph

from torpor.integrations.langgraph import TorporSaver, sandbox_tools
from torpor.session import Session


class State(TypedDict):
    messages: Annotated[list[dict[str, Any]], operator.add]


def build(session: Session, saver: TorporSaver, base_url: str) -> Any:
    tools = {t.name: t for t in sandbox_tools(session)}
    specs = [convert_to_openai_tool(t) for t in tools.values()]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)

    def model(state: State) -> dict[str, Any]:
        r = client.chat.completions.create(
            model="gpt-test", messages=state["messages"], tools=specs, timeout=900
        )
        m = r.choices[0].message
        msg: dict[str, Any] = {"role": "assistant", "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        return {"messages": [msg]}

    def run_tools(state: State) -> dict[str, Any]:
        out = []
        for c in state["messages"][-1]["tool_calls"]:
            fn = c["function"]
            result = tools[fn["name"]].invoke(json.loads(fn["arguments"]))
            out.append({"role": "tool", "tool_call_id": c["id"], "content": result})
        return {"messages": out}

    def route(state: State) -> str:
        return "tools" if state["messages"][-1].get("tool_calls") else END

    g = StateGraph(State)
    g.add_node("model", model)
    g.add_node("tools", run_tools)
    g.add_edge(START, "model")
    g.add_conditional_edges("model", route, ["tools", END])
    g.add_edge("tools", "model")
    return g.compile(checkpointer=saver)


def main() -> None:
    session_id, base_url, thread, text = sys.argv[1:5]
    s = Session.open(session_id)  # TORPOR_HOME from the environment
    graph = build(s, TorporSaver(s), base_url)
    config = {"configurable": {"thread_id": thread}}
    out = graph.invoke({"messages": [{"role": "user", "content": text}]}, config, durability="sync")
    print(json.dumps(out["messages"][-1]), flush=True)


if __name__ == "__main__":
    main()
