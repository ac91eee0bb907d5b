#include "kv/radix_cache.h"

#include <algorithm>
#include <tuple>

#include "core/check.h"

namespace cpinfer {

struct RadixCache::Node {
  std::vector<int32_t> key;  // the page's tokens, then its tag (empty at the root)
  CachedPage page;
  Node* parent = nullptr;
  std::map<std::vector<int32_t>, std::unique_ptr<Node>> children;
  int lock = 0;            // pins of this node or of a node below it
  uint64_t last_used = 0;  // LRU clock
  uint64_t id = 0;         // creation order: ties in LRU order are broken by age
};

RadixCache::RadixCache(int page_size, int n_groups, int32_t group_size)
    : page_size_(page_size), group_size_(group_size), root_(std::make_unique<Node>()) {
  CPI_CHECK(page_size > 0, "prefix cache page size must be > 0, got ", page_size);
  CPI_CHECK(n_groups > 0 && group_size > 0, "prefix cache needs ref groups, got ", n_groups, " of ", group_size);
  evictable_.assign(static_cast<size_t>(n_groups), 0);
}

// Iterative: a long prompt is a path thousands of pages deep, too deep for recursive destructors.
RadixCache::~RadixCache() {
  std::vector<std::unique_ptr<Node>> nodes;
  for (auto& [k, c] : root_->children) nodes.push_back(std::move(c));
  while (!nodes.empty()) {
    std::unique_ptr<Node> n = std::move(nodes.back());
    nodes.pop_back();
    for (auto& [k, c] : n->children) nodes.push_back(std::move(c));
  }
}

// Only an unpinned leaf can be evicted; the index holds exactly those, oldest first. A node's
// last_used changes only while it is out of the index (unindex, change, index).
void RadixCache::index(Node* node) {
  if (node != root_.get() && node->children.empty() && node->lock == 0)
    leaves_.emplace(node->last_used, node->id, node);
}

void RadixCache::unindex(Node* node) { leaves_.erase({node->last_used, node->id, node}); }

void RadixCache::touch(Node* node) {
  ++clock_;
  unindex(node);  // the nodes above have a child: none of them is indexed
  for (Node* n = node; n; n = n->parent) n->last_used = clock_;
  index(node);
}

// A ref is evictable while no pinned node lists it (every node that lists it can then be evicted).
void RadixCache::add_refs(const Node* node) {
  for (int32_t ref : node->page.refs) {
    CPI_CHECK(ref >= 0 && ref / group_size_ < int32_t(evictable_.size()), "prefix cache: ref ", ref,
              " outside its groups");
    if (refs_[ref].nodes++ > 0) continue;
    ++n_refs_;
    ++evictable(ref);  // a new node is not pinned
  }
}

std::vector<int32_t> RadixCache::drop_refs(const Node* node) {
  std::vector<int32_t> freed;
  for (int32_t ref : node->page.refs) {
    auto it = refs_.find(ref);
    if (--it->second.nodes > 0) continue;
    refs_.erase(it);
    --n_refs_;
    --evictable(ref);
    freed.push_back(ref);
  }
  return freed;
}

void RadixCache::pin_refs(const Node* node, int delta) {
  for (int32_t ref : node->page.refs) {
    RefCount& rc = refs_.at(ref);
    if (delta > 0 && rc.pinned++ == 0) --evictable(ref);
    if (delta < 0 && --rc.pinned == 0) ++evictable(ref);
  }
}

RadixCache::Match RadixCache::match(std::span<const int32_t> tokens) {
  // Depth-first over every layout of the matching pages (one per page with a replicated cache):
  // the deepest node wins, the first one found on a tie.
  const size_t ps = static_cast<size_t>(page_size_);
  Node* best = root_.get();
  size_t best_depth = 0;
  std::vector<std::pair<Node*, size_t>> stack = {{root_.get(), 0}};
  std::vector<int32_t> page;
  while (!stack.empty()) {
    auto [node, depth] = stack.back();
    stack.pop_back();
    if (depth > best_depth) {
      best = node;
      best_depth = depth;
    }
    if ((depth + 1) * ps > tokens.size()) continue;
    page.assign(tokens.begin() + depth * ps, tokens.begin() + (depth + 1) * ps);
    for (auto it = node->children.lower_bound(page);
         it != node->children.end() && std::equal(page.begin(), page.end(), it->first.begin()); ++it)
      stack.push_back({it->second.get(), depth + 1});
  }
  Match m;
  m.pages.resize(best_depth);
  m.blocks.resize(best_depth);
  for (Node* n = best; n != root_.get(); n = n->parent) {
    m.pages[--best_depth] = &n->page;
    m.blocks[best_depth] = n->page.refs.empty() ? -1 : n->page.refs.front();
  }
  if (best != root_.get()) {
    m.last = best;
    touch(best);
  }
  return m;
}

void RadixCache::pin(Node* node) {
  for (; node && node != root_.get(); node = node->parent) {
    unindex(node);
    if (node->lock++ == 0) pin_refs(node, +1);
  }
}

void RadixCache::unpin(Node* node) {
  for (; node && node != root_.get(); node = node->parent) {
    CPI_CHECK(node->lock > 0, "prefix cache: unpin of a node that is not pinned");
    if (--node->lock == 0) {
      pin_refs(node, -1);
      index(node);
    }
  }
}

std::vector<int32_t> RadixCache::insert(std::span<const int32_t> tokens, std::span<const CachedPage> pages) {
  const size_t n_pages = tokens.size() / page_size_;
  CPI_CHECK(pages.size() >= n_pages, "prefix cache insert: ", n_pages, " pages but ", pages.size(), " given");
  std::vector<int32_t> taken;
  Node* node = root_.get();
  for (size_t p = 0; p < n_pages; ++p) {
    std::vector<int32_t> key(tokens.begin() + p * page_size_, tokens.begin() + (p + 1) * page_size_);
    key.insert(key.end(), pages[p].tag.begin(), pages[p].tag.end());
    auto it = node->children.find(key);
    if (it != node->children.end()) {
      node = it->second.get();
      continue;
    }
    auto child = std::make_unique<Node>();
    child->key = key;
    child->page = pages[p];
    child->parent = node;
    child->id = ++clock_;
    // A new node under a pinned path is not pinned itself: pins count per node.
    Node* raw = child.get();
    for (int32_t ref : raw->page.refs)
      if (!refs_.contains(ref)) taken.push_back(ref);
    add_refs(raw);
    unindex(node);  // no longer a leaf
    node->children.emplace(std::move(key), std::move(child));
    ++n_nodes_;
    node = raw;
  }
  if (node != root_.get()) touch(node);
  return taken;
}

std::vector<int32_t> RadixCache::insert(std::span<const int32_t> tokens, std::span<const int32_t> blocks) {
  std::vector<CachedPage> pages;
  for (int32_t b : blocks) pages.push_back(CachedPage{{}, {b}});
  return insert(tokens, pages);
}

bool RadixCache::evict_leaf(std::vector<int32_t>& freed) {
  if (leaves_.empty()) return false;
  Node* n = std::get<2>(*leaves_.begin());
  leaves_.erase(leaves_.begin());
  Node* parent = n->parent;
  for (int32_t ref : drop_refs(n)) freed.push_back(ref);
  --n_nodes_;
  const std::vector<int32_t> key = n->key;  // erase destroys n (and its key)
  parent->children.erase(key);
  index(parent);  // a leaf now, perhaps
  return true;
}

std::vector<int32_t> RadixCache::evict(int n_blocks) {
  std::vector<int32_t> freed;
  while (static_cast<int>(freed.size()) < n_blocks && evict_leaf(freed)) {
  }
  return freed;
}

}  // namespace cpinfer
