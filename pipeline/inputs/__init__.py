"""The shared inputs: the concept word list (stage `wordlist`), the token corpus
(stage `corpus`), and the tiny teachers the offline profile builds."""
