// The path of one request's output from the scheduler thread to its HTTP thread: per choice, token
// ids -> text -> stop strings -> reasoning split -> tool-call parsing -> a slot the HTTP thread
// takes from (streaming) or reads at the end.
#pragma once
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "server/api.h"
#include "server/text.h"
#include "server/tools.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer::server {

// The output of one choice not yet taken by the HTTP thread.
struct Slot {
  std::string reasoning, content;
  std::vector<ToolCall> calls;    // parsed tool calls
  std::vector<LogprobEntry> lps;  // logprobs of tokens generated since the last take
  bool finished = false;
  FinishInfo info;
  bool has_news() const { return finished || !reasoning.empty() || !content.empty() || !calls.empty(); }
};

// Scheduler thread -> HTTP thread: the outputs of a request's n choices, consumed as they grow.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Slot> slots;  // guarded by mu
};

// Scheduler thread only: token ids -> text -> stop strings -> reasoning split -> channel.
struct OutputState {
  StreamDecoder decoder;
  StopMatcher stops;
  std::optional<ReasoningSplitter> splitter;
  std::optional<ToolCallParser> tools;  // chat with tools: <tool_call> blocks become calls
  size_t index;                         // the choice
  OutputState(const Tokenizer& tok, std::vector<std::string> stop_strings, bool split, size_t choice)
      : decoder(tok, /*skip_special=*/true), stops(std::move(stop_strings)), index(choice) {
    if (split) splitter.emplace();
  }
  void deliver(Channel& ch, const std::string& text) {
    SplitText s;
    if (splitter)
      s = splitter->push(text);
    else
      s.content = text;
    publish(ch, s);
  }
  void publish(Channel& ch, const SplitText& s) {
    ToolCallParser::Out t;
    if (tools)
      t = tools->push(s.content);
    else
      t.content = s.content;
    if (s.reasoning.empty() && t.content.empty() && t.calls.empty()) return;
    std::lock_guard lk(ch.mu);
    Slot& slot = ch.slots[index];
    slot.reasoning += s.reasoning;
    slot.content += t.content;
    for (ToolCall& c : t.calls) slot.calls.push_back(std::move(c));
    ch.cv.notify_all();
  }
  void finish(Channel& ch, const FinishInfo& info) {
    if (info.reason != "abort" && info.reason != "error") {
      std::string rest = stops.push(decoder.flush());
      rest += stops.flush();
      deliver(ch, rest);
      if (splitter) publish(ch, splitter->flush());
      if (tools) {
        ToolCallParser::Out t = tools->flush();
        std::lock_guard lk(ch.mu);
        ch.slots[index].content += t.content;
        for (ToolCall& c : t.calls) ch.slots[index].calls.push_back(std::move(c));
      }
    }
    std::lock_guard lk(ch.mu);
    ch.slots[index].finished = true;
    ch.slots[index].info = info;
    ch.cv.notify_all();
  }
};

}  // namespace cpinfer::server
