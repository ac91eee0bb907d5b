// Prefix cache: a radix tree over token ids whose edges are whole KV pages (block_size tokens). A
// node is one page: its key is the page's tokens (plus a layout tag, below), its value the KV
// blocks that hold their K/V, and a path from the root spells a token prefix that some earlier
// request put in the cache. Requests that start with such a prefix share those blocks instead of
// prefilling them.
//
// Design (why pages, not tokens): a KV block can only be shared whole, since a request that shares
// it must not write into it. So keys are matched page by page and a prefix that ends inside a page
// is matched up to the last whole page; the tail (< block_size tokens) is recomputed, as SGLang does
// with page_size > 1. Branching ("splitting") happens at page boundaries: two prompts that differ
// inside page k share pages [0, k) and own different nodes for page k.
//
// A node's value is a list of block references ("refs", opaque ints grouped by ref / group_size):
// one block with a replicated KV cache; with sharded KV (--kv-shard, kv_cache.h) the blocks of every
// CP rank that hold the rank's positions of the page (a rank's block may hold positions of two
// pages: two nodes may list the same ref). The tag is the page's layout (with sharded KV: which
// rank owns each position), and is part of the key: the same tokens written with another layout
// are another node, and a match follows the tokens through any layout, taking the deepest path.
//
// The tree is pure bookkeeping (no KV cache, no back-end): the caller holds one reference in the
// KV cache for every distinct ref the tree holds (insert() says which refs it took, evict() which
// it gave back). Requests pin the nodes they use (lock counts along the path); eviction removes the
// least recently used unpinned leaves only, so a pinned page is never evicted.
#pragma once
#include <climits>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace cpinfer {

// One page's value in the tree: its layout tag (part of the key; empty for a replicated cache) and
// the refs of the blocks that hold it.
struct CachedPage {
  std::vector<int32_t> tag;
  std::vector<int32_t> refs;
};

class RadixCache {
 public:
  struct Node;
  // Refs are grouped by ref / group_size into n_groups groups (the CP ranks of a sharded cache):
  // n_evictable_blocks(group) counts per group.
  explicit RadixCache(int page_size, int n_groups = 1, int32_t group_size = INT32_MAX);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  struct Match {
    std::vector<const CachedPage*> pages;  // one per matched page, in order (valid while pinned)
    std::vector<int32_t> blocks;           // the first ref of each page (replicated: its block)
    Node* last = nullptr;                  // node of the last matched page (nullptr: no match); pin/unpin it
    int n_pages() const { return static_cast<int>(pages.size()); }
  };
  // The longest cached prefix of `tokens` in whole pages (n_pages() * page_size tokens), through
  // any layout. Marks the matched nodes as used now (LRU).
  Match match(std::span<const int32_t> tokens);
  // Pins the path from the root to `node` (nullptr: nothing) so that none of it is evicted.
  void pin(Node* node);
  void unpin(Node* node);

  // Adds the whole pages of `tokens` (tokens.size() / page_size of them, pages[i] holding page i)
  // and returns the refs the tree took ownership of: those it did not hold yet, of pages it did not
  // hold yet. Pages already cached (same tokens, same tag) keep their refs (the caller's duplicates
  // stay the caller's).
  std::vector<int32_t> insert(std::span<const int32_t> tokens, std::span<const CachedPage> pages);
  // Replicated: blocks[i] holds page i.
  std::vector<int32_t> insert(std::span<const int32_t> tokens, std::span<const int32_t> blocks);

  // Removes the least recently used unpinned leaf and appends the refs the tree no longer holds to
  // `freed` (the caller drops its references). False when no page is evictable.
  bool evict_leaf(std::vector<int32_t>& freed);
  // Removes unpinned leaves, least recently used first, until at least n_blocks refs were freed
  // (or none is left), and returns those refs.
  std::vector<int32_t> evict(int n_blocks);
  // Removes every unpinned page.
  std::vector<int32_t> clear() { return evict(INT_MAX); }

  int page_size() const { return page_size_; }
  int n_pages() const { return n_nodes_; }
  // Distinct refs the tree holds (replicated: one block per page).
  int n_cached_blocks() const { return n_refs_; }
  // Refs of `group` that evicting every unpinned page would free (those no pinned page lists).
  int n_evictable_blocks(int group = 0) const { return evictable_.at(static_cast<size_t>(group)); }

 private:
  struct RefCount {
    int nodes = 0;   // nodes that list the ref
    int pinned = 0;  // of those, pinned ones
  };
  void touch(Node* node);
  void index(Node* node);
  void unindex(Node* node);
  void add_refs(const Node* node);
  std::vector<int32_t> drop_refs(const Node* node);
  void pin_refs(const Node* node, int delta);
  int& evictable(int32_t ref) { return evictable_.at(static_cast<size_t>(ref / group_size_)); }
  int page_size_;
  int32_t group_size_;
  std::unique_ptr<Node> root_;
  int n_nodes_ = 0;  // nodes besides the root (= cached pages)
  int n_refs_ = 0;
  std::vector<int> evictable_;  // per group
  std::unordered_map<int32_t, RefCount> refs_;
  uint64_t clock_ = 0;
  // Unpinned leaves by (last_used, id): the eviction order, least recently used (then oldest) first.
  std::set<std::tuple<uint64_t, uint64_t, Node*>> leaves_;
};

}  // namespace cpinfer
