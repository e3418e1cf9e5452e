"""WordCount, the reduce side: a word's total is the sum of its (partial) counts."""


def reduce(word, counts):
    return sum(counts)
