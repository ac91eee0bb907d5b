// Pure logic of the server: request parsing/validation, response and SSE framing, stop strings,
// the reasoning split, metrics, and the scheduler's admission/budget/cancel decisions on a fake
// engine.
#include <gtest/gtest.h>

#include <climits>
#include <map>

#include "backends/cpu/cpu_backend.h"
#include "engine/metrics.h"
#include "engine/scheduler.h"
#include "server/api.h"
#include "server/text.h"

namespace cpinfer::server {
namespace {

using nlohmann::json;

ApiError parse_error(Endpoint ep, const std::string& body) {
  try {
    parse_request(ep, body);
  } catch (const ApiError& e) {
    return e;
  }
  ADD_FAILURE() << "no error for " << body;
  return ApiError(0, "");
}

TEST(Api, ParsesChatRequest) {
  GenRequest r = parse_request(Endpoint::Chat, R"({"model":"m","messages":[{"role":"system","content":"s"},
      {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
      "max_completion_tokens":7,"max_tokens":3,"temperature":0.5,"top_p":0.9,"top_k":20,"min_p":0.1,"seed":42,
      "stop":["x","yz"],"stream":true,"stream_options":{"include_usage":true},
      "chat_template_kwargs":{"enable_thinking":false}})");
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[1].content, "ab");
  EXPECT_EQ(*r.max_tokens, 7);  // max_completion_tokens wins
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_EQ(r.sampling.top_k, 20);
  EXPECT_EQ(*r.sampling.seed, 42u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_FALSE(r.enable_thinking);
}

TEST(Api, ParsesCompletionPromptForms) {
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt":"hi","stop":"s"})").prompt, "hi");
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt":["hi"]})").prompt, "hi");
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt":[1,2,3]})").prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt":[[4,5]]})").prompt_ids, (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(*parse_request(Endpoint::Completion, R"({"prompt":"a","max_tokens":3.0})").max_tokens, 3);
}

TEST(Api, RejectsBadInputNamingTheField) {
  struct Case {
    Endpoint ep;
    const char* body;
    const char* param;  // "" = null
  };
  const Case cases[] = {
      {Endpoint::Chat, "{", ""},
      {Endpoint::Chat, "[1]", ""},
      {Endpoint::Chat, R"({})", "messages"},
      {Endpoint::Chat, R"({"messages":"hi"})", "messages"},
      {Endpoint::Chat, R"({"messages":[]})", "messages"},
      {Endpoint::Chat, R"({"messages":[1]})", "messages[0]"},
      {Endpoint::Chat, R"({"messages":[{"role":"bot","content":"x"}]})", "messages[0].role"},
      {Endpoint::Chat, R"({"messages":[{"role":"user","content":5}]})", "messages[0].content"},
      {Endpoint::Chat, R"({"messages":[{"role":"user"}]})", "messages[0].content"},
      {Endpoint::Chat, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})",
       "messages[0].content[0].type"},
      {Endpoint::Completion, R"({"prompt":"a","temperature":"hot"})", "temperature"},
      {Endpoint::Completion, R"({"prompt":"a","temperature":-1})", "temperature"},
      {Endpoint::Completion, R"({"prompt":"a","top_p":0})", "top_p"},
      {Endpoint::Completion, R"({"prompt":"a","top_k":0})", "top_k"},
      {Endpoint::Completion, R"({"prompt":"a","top_k":1.5})", "top_k"},
      {Endpoint::Completion, R"({"prompt":"a","min_p":2})", "min_p"},
      {Endpoint::Completion, R"({"prompt":"a","max_tokens":0})", "max_tokens"},
      {Endpoint::Completion, R"({"prompt":"a","max_tokens":1e30})", "max_tokens"},
      {Endpoint::Completion, R"({"prompt":"a","max_tokens":99999999999})", "max_tokens"},
      {Endpoint::Completion, R"({"prompt":"a","seed":-3})", "seed"},
      {Endpoint::Completion, R"({"prompt":"a","stop":7})", "stop"},
      {Endpoint::Completion, R"({"prompt":"a","stop":["ok",1]})", "stop"},
      {Endpoint::Completion, R"({"prompt":"a","stop":""})", "stop"},
      {Endpoint::Completion, R"({"prompt":"a","n":65})", "n"},
      {Endpoint::Completion, R"({"prompt":"a","stream":"yes"})", "stream"},
      {Endpoint::Completion, R"({"prompt":"a","stream_options":{"include_usage":true}})", "stream_options"},
      {Endpoint::Completion, R"({"prompt":""})", "prompt"},
      {Endpoint::Completion, R"({"prompt":{"a":1}})", "prompt"},
      {Endpoint::Completion, R"({"prompt":["a","b"]})", "prompt"},
      {Endpoint::Completion, R"({"prompt":[1,-2]})", "prompt"},
      {Endpoint::Completion, R"({})", "prompt"},
      {Endpoint::Completion, R"({"prompt":"a","model":3})", "model"},
      {Endpoint::Completion, R"({"prompt":"a","presence_penalty":1})", "presence_penalty"},
      {Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"enable_thinking":1}})",
       "chat_template_kwargs.enable_thinking"},
  };
  for (const Case& c : cases) {
    ApiError e = parse_error(c.ep, c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_FALSE(e.message.empty()) << c.body;
    json j = error_json(e);
    EXPECT_TRUE(j["error"]["message"].is_string());
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_TRUE(j["error"].contains("code"));
  }
}

TEST(Api, ResponsesAndSseFraming) {
  json c = chat_response("id1", 5, "m", "hello", "thought", "stop", Usage{3, 2});
  EXPECT_EQ(c["choices"][0]["message"]["content"], "hello");
  EXPECT_EQ(c["choices"][0]["message"]["reasoning_content"], "thought");
  EXPECT_EQ(c["usage"]["total_tokens"], 5);
  json k = chat_chunk("id1", 5, "m", {{"content", "a"}}, "");
  EXPECT_TRUE(k["choices"][0]["finish_reason"].is_null());
  std::string ev = sse_event(k);
  EXPECT_EQ(ev.rfind("data: {", 0), 0u);
  EXPECT_EQ(ev.substr(ev.size() - 2), "\n\n");
  EXPECT_EQ(json::parse(ev.substr(6)), k);
  EXPECT_EQ(std::string(kSseDone), "data: [DONE]\n\n");
  // Invalid UTF-8 never throws: it is replaced.
  EXPECT_NO_THROW(sse_event(completion_chunk("i", 0, "m", std::string("\xff\xfe"), "")));
  EXPECT_TRUE(usage_chunk(Endpoint::Chat, "i", 0, "m", Usage{1, 1})["choices"].empty());
}

std::string feed(StopMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += m.push(p);
  return out + m.flush();
}

TEST(Text, StopStringsAcrossPieces) {
  StopMatcher a({"END"});
  EXPECT_EQ(feed(a, {"hel", "lo E", "N", "D more"}), "hello ");
  EXPECT_TRUE(a.stopped());
  StopMatcher b({"END"});
  EXPECT_EQ(b.push("abcE"), "abc");  // "E" is held back
  EXPECT_EQ(b.push("x"), "Ex");
  EXPECT_FALSE(b.stopped());
  StopMatcher c({"z", "xy"});  // the earliest occurrence wins, whatever the list order
  EXPECT_EQ(feed(c, {"axyz"}), "a");
  StopMatcher d({});
  EXPECT_EQ(feed(d, {"a", "b"}), "ab");
}

SplitText split_all(const std::vector<std::string>& pieces) {
  ReasoningSplitter s;
  SplitText all;
  for (const auto& p : pieces) {
    SplitText t = s.push(p);
    all.reasoning += t.reasoning;
    all.content += t.content;
  }
  SplitText t = s.flush();
  all.reasoning += t.reasoning;
  all.content += t.content;
  return all;
}

TEST(Text, ReasoningSplit) {
  SplitText a = split_all({"<think>\nLet me", " think.\n</think>\n\nThe answer."});
  EXPECT_EQ(a.reasoning, "Let me think.");
  EXPECT_EQ(a.content, "The answer.");
  // Tags split across tokens give the same result.
  SplitText b = split_all({"<th", "ink>", "\nLet me think.\n", "</thi", "nk>\n\nThe answer."});
  EXPECT_EQ(b.reasoning, a.reasoning);
  EXPECT_EQ(b.content, a.content);
  SplitText c = split_all({"no tags < here"});
  EXPECT_EQ(c.reasoning, "");
  EXPECT_EQ(c.content, "no tags < here");
  SplitText d = split_all({"<think>unfinished"});
  EXPECT_EQ(d.reasoning, "unfinished");
  EXPECT_EQ(d.content, "");
}

TEST(Metrics, HistogramIsCumulativeAndTextFormatHasGauges) {
  Histogram h({0.1, 1.0});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  std::string out;
  h.render(out, "x", "help");
  EXPECT_NE(out.find("x_bucket{le=\"0.1\"} 1\n"), std::string::npos) << out;
  EXPECT_NE(out.find("x_bucket{le=\"1\"} 2\n"), std::string::npos) << out;
  EXPECT_NE(out.find("x_bucket{le=\"+Inf\"} 3\n"), std::string::npos) << out;
  EXPECT_NE(out.find("x_count 3\n"), std::string::npos);
  Metrics m;
  m.add_prompt_tokens(5);
  std::string text = m.render(Gauges{2, 3, 0.25, 16, 64, 7});
  EXPECT_NE(text.find("cpinfer_num_running_reqs 2\n"), std::string::npos);
  EXPECT_NE(text.find("cpinfer_num_waiting_reqs 3\n"), std::string::npos);
  EXPECT_NE(text.find("cpinfer_kv_cache_usage 0.25\n"), std::string::npos);
  EXPECT_NE(text.find("cpinfer_prompt_tokens_total 5\n"), std::string::npos);
  EXPECT_NE(text.find("cpinfer_preemptions_total 7\n"), std::string::npos);
}

// A fake engine: paged blocks like KvCache, and logits whose argmax is (n_cached + n) % kVocab.
class FakeRunner : public ModelRunner {
 public:
  static constexpr int kVocab = 8;
  FakeRunner(int n_blocks, int block_size) : n_blocks_(n_blocks), bs_(block_size), free_(n_blocks) {}
  int add_sequence() override {
    int id = next_++;
    seqs_[id] = 0;
    return id;
  }
  void reserve(int seq, int n) override {
    int need = (n + bs_ - 1) / bs_ - seqs_.at(seq);
    if (need > 0) {
      if (need > free_) throw std::runtime_error("fake KV cache full");
      free_ -= need;
      seqs_[seq] += need;
    }
  }
  void free_sequence(int seq) override {
    free_ += seqs_.at(seq);
    seqs_.erase(seq);
  }
  void reserve_synthetic(int seq, int n) override {
    EXPECT_EQ(seqs_.at(seq), 0) << "a synthetic context goes into an empty sequence";
    reserve(seq, n);
    synthetic.push_back({seq, n});
  }
  std::vector<int32_t> run(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows) override {
    steps.push_back(work);
    last_tokens.clear();
    for (const SeqWork& w : work) last_tokens.emplace_back(w.tokens.begin(), w.tokens.end());
    std::vector<int32_t> out;
    for (size_t i = 0; i < work.size(); ++i) {
      const SeqWork& w = work[i];
      int32_t id = -1;
      if (w.logits == LogitsWanted::Last) {
        std::vector<float> row(kVocab, 0.0f);
        row[(w.n_cached + w.tokens.size()) % kVocab] = 10.0f;
        id = sample_reference(row, rows[i]);
      }
      out.push_back(id);
    }
    return out;
  }
  int block_size() const override { return bs_; }
  int n_blocks() const override { return n_blocks_; }
  int n_free_blocks() const override { return free_; }
  std::vector<std::vector<SeqWork>> steps;
  std::vector<std::pair<int, int>> synthetic;  // reserve_synthetic calls (seq, n)
  // The tokens of each entry of the last run (the spans in `steps` point into the scheduler's
  // buffers of a step that has ended).
  std::vector<std::vector<int32_t>> last_tokens;

 private:
  int n_blocks_, bs_, free_, next_ = 0;
  std::map<int, int> seqs_;
};

struct Done {
  std::string reason;
  std::vector<int32_t> tokens;
  bool finished = false;
};

std::shared_ptr<SchedRequest> make_req(int prompt_len, int max_tokens, Done& done) {
  auto r = std::make_shared<SchedRequest>();
  r->prompt.assign(prompt_len, 1);
  r->max_tokens = max_tokens;
  r->sampling.temperature = 0;
  r->on_token = [&done](int32_t t) {
    done.tokens.push_back(t);
    return true;
  };
  r->on_finish = [&done](const FinishInfo& f) {
    done.reason = f.reason;
    done.finished = true;
  };
  return r;
}

TEST(Scheduler, NeverFitsNamesTheLimit) {
  FakeRunner fake(4, 4);
  SchedulerOptions opt;
  opt.context_length = 12;
  Scheduler s(fake, opt);
  EXPECT_EQ(s.never_fits(6, 6), "");
  EXPECT_NE(s.never_fits(6, 7).find("context length of 12"), std::string::npos);
  opt.context_length = 100;
  Scheduler s2(fake, opt);
  EXPECT_NE(s2.never_fits(10, 10).find("KV cache capacity of 16"), std::string::npos);
}

TEST(Scheduler, AdmitsOnlyWhatFitsAndFreesOnFinish) {
  FakeRunner fake(4, 4);  // 16 positions
  SchedulerOptions opt;
  opt.decode_reserve_tokens = INT_MAX;  // reserve max_tokens up front: b must wait for a
  Scheduler s(fake, opt);
  Done a, b;
  s.submit(make_req(6, 6, a));  // 3 blocks
  s.submit(make_req(4, 4, b));  // 2 blocks: waits until a is done
  ASSERT_TRUE(s.step());
  EXPECT_EQ(s.n_running(), 1);
  EXPECT_EQ(s.n_waiting(), 1);
  while (!a.finished) ASSERT_TRUE(s.step());
  EXPECT_EQ(a.reason, "length");
  EXPECT_EQ(a.tokens.size(), 6u);
  // Token k of a is sampled after 6 + k positions: argmax = (6 + k) % 8.
  EXPECT_EQ(a.tokens[0], 6);
  EXPECT_EQ(a.tokens[1], 7);
  EXPECT_EQ(a.tokens[2], 0);
  while (!b.finished) ASSERT_TRUE(s.step());
  EXPECT_FALSE(s.step());
  EXPECT_EQ(fake.n_free_blocks(), 4);
  EXPECT_DOUBLE_EQ(s.gauges().kv_usage, 0.0);
}

TEST(Scheduler, PreemptsTheNewestWhenDecodingRunsOutOfBlocksAndRecomputesIt) {
  FakeRunner fake(8, 4);  // 32 positions
  SchedulerOptions opt;
  opt.decode_reserve_tokens = 1;  // admit optimistically
  Scheduler s(fake, opt);
  Done d[4];
  const int plen[4] = {5, 6, 7, 3};
  for (int i = 0; i < 4; ++i) s.submit(make_req(plen[i], 12, d[i]));  // 4 x up to 18 positions > 32
  for (int n = 0; n < 1000 && !(d[0].finished && d[1].finished && d[2].finished && d[3].finished); ++n) s.step();
  EXPECT_GT(s.n_preempted(), 0u);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(d[i].finished) << i;
    EXPECT_EQ(d[i].reason, "length");
    // Recomputation changes nothing: token k still follows plen + k positions.
    ASSERT_EQ(d[i].tokens.size(), 12u) << i;
    for (int k = 0; k < 12; ++k) EXPECT_EQ(d[i].tokens[k], (plen[i] + k) % FakeRunner::kVocab) << i << " " << k;
  }
  EXPECT_EQ(fake.n_free_blocks(), 8);
  // Resumed requests were re-filled without sampling again: each produced exactly its 12 tokens.
}

TEST(Scheduler, ChunkedPrefillKeepsTheBudgetAndServesShortPromptsFirst) {
  FakeRunner fake(64, 16);
  SchedulerOptions opt;
  opt.chunked_prefill_size = 8;
  Scheduler s(fake, opt);
  Done lng, shrt;
  s.submit(make_req(20, 2, lng));
  ASSERT_TRUE(s.step());
  ASSERT_EQ(fake.steps.back().size(), 1u);
  EXPECT_EQ(fake.steps.back()[0].tokens.size(), 8u);
  EXPECT_EQ(fake.steps.back()[0].logits, LogitsWanted::None);
  s.submit(make_req(3, 2, shrt));
  ASSERT_TRUE(s.step());
  // The short prompt goes first and whole; the long one gets the rest of the budget.
  ASSERT_EQ(fake.steps.back().size(), 2u);
  EXPECT_EQ(fake.steps.back()[0].tokens.size(), 3u);
  EXPECT_EQ(fake.steps.back()[0].logits, LogitsWanted::Last);
  EXPECT_EQ(fake.steps.back()[1].tokens.size(), 5u);
  EXPECT_EQ(fake.steps.back()[1].n_cached, 8);
  EXPECT_EQ(shrt.tokens.size(), 1u);  // first token right after its prefill
  for (const auto& step : fake.steps) {
    size_t n = 0;
    for (const auto& w : step) n += w.tokens.size();
    EXPECT_LE(n, 8u);
  }
  while (!lng.finished || !shrt.finished) ASSERT_TRUE(s.step());
  // Continuous batching: some step decoded one token while prefilling the long prompt.
  bool mixed = false;
  for (const auto& step : fake.steps) {
    bool has_decode = false, has_prefill = false;
    for (const auto& w : step) (w.tokens.size() == 1 && w.n_cached >= 3 ? has_decode : has_prefill) = true;
    mixed = mixed || (has_decode && has_prefill);
  }
  EXPECT_TRUE(mixed);
}

TEST(Scheduler, StopIdsCallbackStopAndCancellation) {
  FakeRunner fake(16, 4);
  Scheduler s(fake, SchedulerOptions{});
  Done a, b, c;
  auto ra = make_req(5, 10, a);
  ra->stop_ids = {7};  // argmax after 5 positions is 5, then 6, then 7
  s.submit(ra);
  auto rb = make_req(5, 10, b);
  rb->on_token = [&b](int32_t t) {
    b.tokens.push_back(t);
    return b.tokens.size() < 2;  // a stop string after the second token
  };
  s.submit(rb);
  auto rc = make_req(5, 20, c);
  s.submit(rc);
  while (!a.finished || !b.finished) ASSERT_TRUE(s.step());
  EXPECT_EQ(a.reason, "stop");
  EXPECT_EQ(a.tokens, (std::vector<int32_t>{5, 6}));  // the stop id is not passed on
  EXPECT_EQ(b.reason, "stop");
  EXPECT_EQ(b.tokens.size(), 2u);
  EXPECT_FALSE(c.finished);
  EXPECT_LT(fake.n_free_blocks(), 16);
  rc->cancelled = true;
  s.step();
  EXPECT_TRUE(c.finished);
  EXPECT_EQ(c.reason, "abort");
  EXPECT_EQ(fake.n_free_blocks(), 16);
  EXPECT_EQ(s.n_running(), 0);
}

TEST(Scheduler, RespectsMaxRunningRequests) {
  FakeRunner fake(64, 4);
  SchedulerOptions opt;
  opt.max_running_requests = 2;
  Scheduler s(fake, opt);
  Done d[3];
  for (auto& x : d) s.submit(make_req(2, 3, x));
  ASSERT_TRUE(s.step());
  EXPECT_EQ(s.n_running(), 2);
  EXPECT_EQ(s.n_waiting(), 1);
  while (!d[2].finished) ASSERT_TRUE(s.step());
  EXPECT_TRUE(d[0].finished && d[1].finished);
}

// Benchmarks' synthetic contexts (bench decode): the positions are reserved and counted as present,
// and the one-token prompt is the first decode step at that context.
std::shared_ptr<SchedRequest> synthetic_req(int context, int32_t first, int max_tokens, Done& done) {
  auto r = make_req(1, max_tokens, done);
  r->prompt = {first};
  r->synthetic_context = context;
  return r;
}

TEST(Scheduler, SyntheticContextStartsStraightInDecode) {
  FakeRunner fake(16, 4);  // 64 positions
  Scheduler s(fake, SchedulerOptions{});
  Done d;
  s.submit(synthetic_req(40, 3, 3, d));
  ASSERT_TRUE(s.step());
  ASSERT_EQ(fake.synthetic.size(), 1u);
  EXPECT_EQ(fake.synthetic[0].second, 40);
  ASSERT_EQ(fake.steps.back().size(), 1u);
  const SeqWork& w0 = fake.steps.back()[0];
  EXPECT_EQ(w0.kv_seq, fake.synthetic[0].first);
  EXPECT_EQ(w0.n_cached, 40);  // nothing of the context is computed
  EXPECT_EQ(fake.last_tokens[0], std::vector<int32_t>{3});
  EXPECT_EQ(w0.logits, LogitsWanted::Last);
  EXPECT_EQ(fake.n_free_blocks(), 16 - 11);  // 41 positions
  for (int k = 1; k < 3; ++k) {
    ASSERT_TRUE(s.step());
    // A decode step: the last token drawn is fed back.
    ASSERT_EQ(fake.steps.back().size(), 1u);
    EXPECT_EQ(fake.steps.back()[0].n_cached, 40 + k);
    EXPECT_EQ(fake.last_tokens[0], std::vector<int32_t>{d.tokens[size_t(k - 1)]});
  }
  EXPECT_TRUE(d.finished);
  EXPECT_EQ(d.reason, "length");
  // Token k follows 41 + k positions: argmax (41 + k) % 8.
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(fake.n_free_blocks(), 16);
  EXPECT_EQ(fake.synthetic.size(), 1u);
}

TEST(Scheduler, SyntheticContextCountsInAdmissionAndBatchesAsDecode) {
  FakeRunner fake(16, 4);  // 64 positions
  SchedulerOptions opt;
  opt.decode_reserve_tokens = INT_MAX;
  Scheduler s(fake, opt);
  Done d[3];
  // Each counts 28 + 1 + 2 + 1 = 32 positions (8 blocks): two fit, the third waits.
  for (int i = 0; i < 3; ++i) s.submit(synthetic_req(28, int32_t(i), 2, d[i]));
  ASSERT_TRUE(s.step());
  EXPECT_EQ(s.n_running(), 2);
  EXPECT_EQ(s.n_waiting(), 1);
  // The first step of both is one batch of one-token entries at the context, as a decode step.
  ASSERT_EQ(fake.steps.back().size(), 2u);
  for (const SeqWork& w : fake.steps.back()) {
    EXPECT_EQ(w.n_cached, 28);
    EXPECT_EQ(w.tokens.size(), 1u);
  }
  while (!d[2].finished) ASSERT_TRUE(s.step());
  for (auto& x : d) {
    EXPECT_EQ(x.reason, "length");
    EXPECT_EQ(x.tokens, (std::vector<int32_t>{5, 6}));  // (29 + k) % 8
  }
  EXPECT_EQ(fake.n_free_blocks(), 16);
}

TEST(Scheduler, PreemptedSyntheticRequestRecomputesAfterItsContext) {
  FakeRunner fake(12, 4);  // 48 positions
  SchedulerOptions opt;
  opt.decode_reserve_tokens = 1;  // admit both (5 blocks each), preempt when they grow
  Scheduler s(fake, opt);
  Done a, b;
  s.submit(synthetic_req(16, 1, 10, a));  // grows to 26 positions: 7 blocks each
  s.submit(synthetic_req(16, 2, 10, b));
  for (int n = 0; n < 100 && !(a.finished && b.finished); ++n) s.step();
  ASSERT_TRUE(a.finished && b.finished);
  EXPECT_GT(s.n_preempted(), 0u);
  std::vector<int32_t> want;
  for (int k = 0; k < 10; ++k) want.push_back((17 + k) % FakeRunner::kVocab);
  EXPECT_EQ(a.tokens, want);
  EXPECT_EQ(b.tokens, want);
  // The preempted one came back with a new synthetic context and prefilled its prompt and output
  // after it, in one forward.
  EXPECT_EQ(fake.synthetic.size(), 2u + s.n_preempted());
  bool recomputed = false;
  for (const auto& step : fake.steps)
    for (const SeqWork& w : step) recomputed = recomputed || (w.n_cached == 16 && w.tokens.size() > 1);
  EXPECT_TRUE(recomputed);
  EXPECT_EQ(fake.n_free_blocks(), 12);
}

TEST(Scheduler, SyntheticContextRefusesWhatItCannotMean) {
  FakeRunner fake(16, 4);
  Scheduler s(fake, SchedulerOptions{});
  Done d;
  auto neg = synthetic_req(-1, 0, 1, d);
  EXPECT_THROW(s.submit(neg), Error);
  auto logits = synthetic_req(8, 0, 1, d);
  logits->on_prompt_logits = [](int, std::span<const float>) {};
  EXPECT_THROW(s.submit(logits), Error);
  auto empty = synthetic_req(8, 0, 1, d);
  empty->prompt.clear();
  EXPECT_THROW(s.submit(empty), Error);
  EXPECT_FALSE(s.step());
}

}  // namespace
}  // namespace cpinfer::server
