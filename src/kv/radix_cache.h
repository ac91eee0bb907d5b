// Prefix cache: a radix tree over token ids whose edges are whole KV pages (block_size tokens, one
// KV block each). A node is one page: its key is the page's tokens, its value the block that holds
// their K/V, and a path from the root spells a token prefix that some earlier request put in the
// cache. Requests that start with such a prefix share those blocks instead of prefilling them.
//
// Design (why pages, not tokens): a KV block can only be shared whole, since a request that shares
// it must not write into it. So keys are matched page by page and a prefix that ends inside a page
// is matched up to the last whole page; the tail (< block_size tokens) is recomputed, as SGLang does
// with page_size > 1. Branching ("splitting") happens at page boundaries: two prompts that differ
// inside page k share pages [0, k) and own different nodes for page k.
//
// The tree is pure bookkeeping (no KV cache, no back-end): the caller holds one reference in the
// KV cache for every block the tree owns (insert() says which blocks it took, evict() which it
// gave back). Requests pin the nodes they use (lock counts along the path); eviction removes the
// least recently used unpinned leaves only, so a pinned page is never evicted.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <tuple>
#include <vector>

namespace cpinfer {

class RadixCache {
 public:
  struct Node;
  explicit RadixCache(int page_size);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  struct Match {
    std::vector<int32_t> blocks;  // one per matched page, in order
    Node* last = nullptr;         // node of the last matched page (nullptr: no match); pin/unpin it
    int n_tokens() const { return static_cast<int>(blocks.size()); }
  };
  // The longest cached prefix of `tokens` in whole pages (Match::blocks.size() pages, i.e.
  // blocks.size() * page_size tokens). Marks the matched nodes as used now (LRU).
  Match match(std::span<const int32_t> tokens);
  // Pins the path from the root to `node` (nullptr: nothing) so that none of it is evicted.
  void pin(Node* node);
  void unpin(Node* node);

  // Adds the whole pages of `tokens` (tokens.size() / page_size of them, blocks[i] holding page i)
  // and returns the blocks the tree took ownership of: those of pages it did not hold yet. Pages
  // already cached keep their block (the caller's duplicate stays the caller's).
  std::vector<int32_t> insert(std::span<const int32_t> tokens, std::span<const int32_t> blocks);

  // Removes up to n_blocks unpinned pages, least recently used leaves first, and returns their
  // blocks (the caller drops its references).
  std::vector<int32_t> evict(int n_blocks);
  // Removes every unpinned page (evict(all)).
  std::vector<int32_t> clear() { return evict(n_cached_blocks()); }

  int page_size() const { return page_size_; }
  int n_cached_blocks() const { return n_nodes_; }
  // Pages that evict() could free now (those not pinned).
  int n_evictable_blocks() const { return n_nodes_ - n_pinned_; }

 private:
  void touch(Node* node);
  void index(Node* node);
  void unindex(Node* node);
  int page_size_;
  std::unique_ptr<Node> root_;
  int n_nodes_ = 0;   // nodes besides the root (= cached pages)
  int n_pinned_ = 0;  // of those, pinned ones
  uint64_t clock_ = 0;
  // Unpinned leaves by (last_used, id): the eviction order, least recently used (then oldest) first.
  std::set<std::tuple<uint64_t, uint64_t, Node*>> leaves_;
};

}  // namespace cpinfer
