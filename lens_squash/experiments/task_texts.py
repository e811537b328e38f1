"""The paper's prompt texts for the copying and counting tasks of Section 3, verbatim.

From Appendix C.1 ("Experimental Details") and, for the two prompt-structure ablations, Appendix C.5
of Barbero et al., *Transformers need glasses! Information over-squashing in language tasks*
(NeurIPS 2024). :mod:`lens_squash.experiments.task_prompts` assembles them into prompts.

Wording kept as the paper prints it (``PAPER_QUIRKS`` lists each case):

- the sum prompt ends in a double full stop, "… is your answer..";
- the ones-counting prompt reads "following sequence:seq" (no space after the colon) and
  "where ’xxxx is your answer." (the closing quote after xxxx is missing);
- the word-counting prompt opens the sentence with ’ (a right quote) rather than ‘;
- the quotes are the paper's typographic ones (’ ‘ “ ”), not ASCII.

One normalisation: the Type 1 prompt of Appendix C.5 is printed as
“What is … <ANSWER>’ ”. Here is the sequence: {seq}; the “ ” are the paper's quotation marks around
the first sentence, not prompt text, so the prompt is "What is … <ANSWER>’. Here is the sequence: {seq}".
"""

from __future__ import annotations

__all__ = [
    "ANSWER_FORMAT", "ANSWER_ONLY", "BERNOULLI_EXAMPLES", "BERNOULLI_P", "CAR_EXAMPLES", "CAR_P", "COPY_FIRST",
    "COPY_LAST", "COPY_TYPE1", "COPY_TYPE2", "COT", "COUNT_CAR", "COUNT_ONES", "FILLER_WORDS", "FINAL_FORMAT",
    "HINT", "ONES_EXAMPLES", "PAPER_QUIRKS", "SUM", "SUM_EXAMPLES",
]  # fmt: skip

#: probability of a one in task (iii) (Section 3.2)
BERNOULLI_P = 0.7
#: probability that a word of task (iv) is 'car' (ours: the paper does not give it)
CAR_P = 0.25

ANSWER_FORMAT = "Please answer exactly as ‘The answer to your question is: <ANSWER>’"

COPY_LAST = "Consider the following sequence: {seq}. What is the last digit in this sequence? " + ANSWER_FORMAT
# The Appendix gives only the last-digit prompt and says to "change appropriately"; the first-element
# task of Figure 2 (a) asks for the first digit with otherwise identical wording.
COPY_FIRST = COPY_LAST.replace("the last digit", "the first digit")
# Section 3.1 quotes the hint as “ *Hint* It’s not necessarily a 1, check carefully” (leading space
# included); we append it to the end of the copying prompt.
HINT = " *Hint* It’s not necessarily a 1, check carefully"
# Appendix C.5, Type 1 (normalised: the paper's closing ” dropped, see the module docstring).
COPY_TYPE1 = "What is the last digit of the following sequence? " + ANSWER_FORMAT + ". Here is the sequence: {seq}"
# Appendix C.5, Type 2, verbatim.
COPY_TYPE2 = ANSWER_FORMAT + ". What is the last digit of the following sequence? {seq}"

FINAL_FORMAT = "Please give the answer on the final line exactly as ’The final answer to your maths question is: xxxx’"
# verbatim, including the double full stop at the end
SUM = "Please perform the following sum: {seq}. " + FINAL_FORMAT + ", where ’xxxx’ is your answer.."
# verbatim, including "sequence:seq" with no space and the missing quote after the second xxxx
COUNT_ONES = (
    "Please count the number of ones in the following sequence:{seq}. " + FINAL_FORMAT + ", where ’xxxx is your answer."
)
# verbatim, including the sentence opened by ’ rather than ‘
COUNT_CAR = (
    "Please count the number of times ‘car’ appears in the following sentence: ’{seq}’. "
    + FINAL_FORMAT
    + ", where ’xxxx’ is your answer."
)

#: the paper's typos and oddities that the prompts above keep (or, for Type 1, normalise)
PAPER_QUIRKS: dict[str, str] = {
    "sum_ones": "ends with a double full stop: '… is your answer..'",
    "count_ones": "'following sequence:{seq}' has no space; \"where ’xxxx is\" lacks the closing quote",
    "count_bernoulli": "same prompt as count_ones, so the same two quirks",
    "count_car": "the sentence is wrapped as ’{seq}’ (two right quotes)",
    "copy_type1": "normalised: the paper's “ … ” quotation marks around the first sentence are dropped",
}

COT = "Let’s think step by step, showing me your reasoning."
# Ours, faithful to Section 3.2's "(1) Is instructed to only output the answer".
ANSWER_ONLY = "Only output the answer, without any explanation or working."

SUM_EXAMPLES = (  # Appendix C.1, verbatim
    "Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1\n"
    "We divide the sum into groups of 5.\n"
    "(1 + 1 + 1 + 1 + 1) + (1 + 1 + 1 + 1 + 1) + 1 + 1\n"
    "The answer is then 2 * 5 + 2 = 12\n"
    "The final answer to your maths question is: 12",
    "Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1\n"
    "We divide the sum into groups of 5.\n"
    "(1 + 1 + 1 + 1 + 1) + 1\n"
    "The answer is then 1 * 5 + 1 = 6\n"
    "The final answer to your maths question is: 6",
)
# Ours: the Appendix says only "With similar strategies for the experiments"; these follow the
# format of the two sums above (question, grouping, arithmetic, final line).
ONES_EXAMPLES = (
    "Please count the number of ones in the following sequence: 1 1 1 1 1 1 1 1 1 1 1 1\n"
    "We divide the sequence into groups of 5.\n"
    "(1 1 1 1 1) (1 1 1 1 1) 1 1\n"
    "The answer is then 2 * 5 + 2 = 12\n"
    "The final answer to your maths question is: 12",
    "Please count the number of ones in the following sequence: 1 1 1 1 1 1\n"
    "We divide the sequence into groups of 5.\n"
    "(1 1 1 1 1) 1\n"
    "The answer is then 1 * 5 + 1 = 6\n"
    "The final answer to your maths question is: 6",
)
BERNOULLI_EXAMPLES = (  # ours
    "Please count the number of ones in the following sequence: 1 0 1 1 0 1 1 1 0 1 1 1\n"
    "We divide the sequence into groups of 5 and count the ones in each group.\n"
    "(1 0 1 1 0) (1 1 1 0 1) (1 1)\n"
    "The answer is then 3 + 4 + 2 = 9\n"
    "The final answer to your maths question is: 9",
    "Please count the number of ones in the following sequence: 0 1 1 0 1 1 1\n"
    "We divide the sequence into groups of 5 and count the ones in each group.\n"
    "(0 1 1 0 1) (1 1)\n"
    "The answer is then 3 + 2 = 5\n"
    "The final answer to your maths question is: 5",
)
CAR_EXAMPLES = (  # ours
    "Please count the number of times ‘car’ appears in the following sentence: ’the car is red and my car is fast’\n"
    "We go through the sentence word by word and number each ‘car’.\n"
    "the, car (1), is, red, and, my, car (2), is, fast\n"
    "The answer is then 2\n"
    "The final answer to your maths question is: 2",
    "Please count the number of times ‘car’ appears in the following sentence: ’a car and a bus and a car and a car’\n"
    "We go through the sentence word by word and number each ‘car’.\n"
    "a, car (1), and, a, bus, and, a, car (2), and, a, car (3)\n"
    "The answer is then 3\n"
    "The final answer to your maths question is: 3",
)

#: everyday filler words for task (iv); none contains 'car' (no scar, cart, card, carpet, …)
FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "my", "his", "her", "and", "is", "was", "very", "near",
    "red", "blue", "green", "yellow", "white", "big", "small", "old", "new", "fast",
    "slow", "little", "dog", "house", "tree", "road", "street", "bus", "bike", "train",
    "garden", "window", "door", "city", "park", "bridge", "shop", "school", "went", "saw",
)  # fmt: skip
